"""Fine-tune a wav2vec2 / XLS-R encoder with CTC.

    python train.py                                        # tiny model on the embedded demo
    python train.py lang=hy model=xlsr_1b sched=tristage data.root=<cv-corpus/hy-AM>
    python train.py hydra.run.dir=<run> ckpt_path=last     # resume a run where it stopped, with its config
    sbatch slurm/train.sbatch experiment=cv8_hy_1b ...     # on a SLURM cluster (README: several GPUs)

Writes into the run directory: config.yaml, vocab.json, data_report.json, checkpoints/ (last and
best by dev CER), model/ (the best model, HF format), results.md and results.json. A run signalled by
SLURM saves checkpoints/requeue.ckpt and requeues its job; started again in that directory it resumes.
A resumed run starts from its own config.yaml (kept as config.<n>.yaml at each start); the command line
applies on top, but may not change what the checkpoint means (asr.run.provenance.resumed). One process trains in a
run directory at a time (asr.run.rundir).

Exit status: 0 when the run completed, was signalled and saved (requeued), or had nothing left to train;
1 with one `error:` line for what the user fixes (a setting, a file, a checkpoint, a run directory in use)
or a run that stopped itself (its state kept); a traceback and 1 for a crash.
"""

import sys

import hydra
from omegaconf import DictConfig

from asr import Complete, Requeued, SetupError, TrainingStopped
from asr.core.config import register_resolvers
from asr.run import tracking
from asr.run.training import train
from asr.tools import cli

register_resolvers()  # before Hydra composes, here and in a SLURM job that unpickles `main`


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    """The job's results (a search reads its objective from them)."""
    try:
        results = train(cfg)
    except (SetupError, TrainingStopped) as error:
        tracking.finish(exit_code=1)
        if tracking.job_context()["sweep_dir"]:
            raise  # Hydra marks the job failed (with its overrides); a search goes on with its next trial
        sys.exit(f"error: {error}")
    except Complete as done:  # a finished run resumed, a requeued job that had ended: nothing to do
        print(f"{done}", flush=True)
        return done.results
    except Requeued as stopped:
        tracking.preempted()
        # Exit, not return: under Hydra's submitit launcher a return would report the job finished.
        print(f"{stopped}", flush=True)
        sys.exit(0)
    except BaseException:
        tracking.finish(exit_code=1)  # a crashed job's W&B run is marked failed
        raise
    tracking.finish(exit_code=0)  # the next job of a multirun starts its own W&B run
    if results:
        print(f"{outcome(results)}  after {results['train_seconds']:.0f} s -> {cfg.run_dir}")
    return results


def outcome(results: dict) -> str:
    """The best evaluation's figures, or when the first evaluation would have come."""
    if "val_cer" in results:
        return f"dev WER {results['val_wer']:.4f}  CER {results['val_cer']:.4f}"
    first = results.get("first_evaluation_at_update")
    when = (f"the first comes after update {first} (val_every_updates or trainer.val_check_interval sets it)"
            if first else "dev evaluation is off")
    return f"no dev evaluation in {results.get('updates', 'these')} updates: {when}"


if __name__ == "__main__":
    cli.start("train", main)
