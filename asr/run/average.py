"""Checkpoint averaging: the weights of several checkpoints of a run, averaged into one checkpoint that
evaluate.py (`ckpt_path=`), transcribe.py (`model_path=`) and `python -m asr.tools.export` take. As fairseq's
scripts/average_checkpoints.py and ESPnet's average_nbest_models: floating tensors averaged (here in float64,
then cast back), other tensors (integer buffers) taken from the newest checkpoint.

    python -m asr.tools.average run=<run> best=5                  # -> <run>/checkpoints/average-best5.ckpt
    python -m asr.tools.average run=<run> last=5 out=<file.ckpt>
    python -m asr.tools.average ckpts=[<a.ckpt>,<b.ckpt>] out=<file.ckpt>

At the end of a run: `callbacks.average.best=N` (`AverageBest`). Settings: conf/average.yaml (`--help`).
"""

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch

from asr import SetupError
from asr.core import checkpoints
from asr.model import inference
from asr.run.evaluation import dev_rates
from asr.run.report import RunReport

log = logging.getLogger(__name__)

# What an average keeps of the newest checkpoint besides its state_dict: what a model loads from (`checkpoints.KEYS`)
# and where it stood. Not the optimizer, schedule, loops or callback states: an average is not a state to resume.
# "base": adapters and LoRA checkpoints name the frozen base their weights complete (asr.model.finetune);
# "datamodule_hyper_parameters": the data the run trained on, which evaluate.py scores when the average is
# written outside its run (no config.yaml beside it).
KEPT = (*checkpoints.KEYS, "base", "epoch", "global_step", "pytorch-lightning_version", "hparams_name",
        "datamodule_hparams_name", "datamodule_hyper_parameters")


@dataclass
class Source:
    """A checkpoint to average: its path, the update it was saved at, and the dev evaluation at that update
    (None when it holds none: a final last.ckpt after the last evaluation, another program's checkpoint)."""

    path: Path
    step: int
    val_cer: float | None
    val_wer: float | None

    def line(self) -> str:
        cer = "-" if self.val_cer is None else f"{self.val_cer:.4f}"
        return f"{self.path.name}  update {self.step}  dev CER {cer}"


def source(path: str | Path) -> Source:
    """`path` as a `Source`; SetupError when it is not a checkpoint of train.py (`checkpoints.problem`). Its dev
    CER and WER are the run report's evaluation at its update, which train.py stores in every checkpoint (the
    rows of results.json's `evaluations`; Lightning's own `current_score` is that of the last best save, stale
    in a last.ckpt). The tensors are mapped, not read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SetupError(f"{path} does not exist (train.py writes <run>/checkpoints/*.ckpt)")
    if why := checkpoints.problem(path):
        raise SetupError(why)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    step = int(checkpoint.get("global_step", 0))
    rows = checkpoint.get("callbacks", {}).get(RunReport.__qualname__, {}).get("rows", [])
    row = next((r for r in rows if r.get("step") == step), {})
    return Source(path, step, row.get("val_cer"), row.get("val_wer"))


def chosen(run_dir: str | Path, best: int | None = None, last: int | None = None) -> list[Source]:
    """The checkpoints of a run to average: the `best` of lowest dev CER among checkpoints/best-step*.ckpt (the
    newer first where two score alike), or the `last` of highest update among those and last.ckpt (one
    file per update). SetupError, saying how many there are, when there are fewer than asked."""
    checkpoint_dir = Path(run_dir).expanduser() / "checkpoints"
    if not checkpoint_dir.is_dir():
        raise SetupError(f"run={run_dir} has no checkpoints/ (give the directory train.py ran in)")
    kept = [source(p) for p in sorted(checkpoint_dir.glob("best-step*.ckpt"))]
    if best is not None:
        unscored = [s.path.name for s in kept if s.val_cer is None]
        if unscored:
            raise SetupError(f"{', '.join(unscored)} in {checkpoint_dir} hold no dev evaluation at their update: "
                             f"best= cannot rank them; give ckpts=[...]")
        if len(kept) < best:
            raise SetupError(_fewer(checkpoint_dir, kept, best, "best"))
        return sorted(kept, key=lambda s: (s.val_cer, -s.step))[:best]
    if (checkpoint_dir / "last.ckpt").is_file():
        final = source(checkpoint_dir / "last.ckpt")
        kept += [final] if final.step not in {s.step for s in kept} else []  # the same weights as its best-step
    if len(kept) < last:
        raise SetupError(_fewer(checkpoint_dir, kept, last, "last"))
    return sorted(kept, key=lambda s: -s.step)[:last]


def _fewer(checkpoint_dir: Path, kept: list[Source], n: int, how: str) -> str:
    names = ", ".join(s.path.name for s in sorted(kept, key=lambda s: s.step)) or "none"
    return (f"{how}={n}: {checkpoint_dir} holds {len(kept)} checkpoint{'s' * (len(kept) != 1)} to pick from "
            f"({names}). train.py keeps the callbacks.checkpoint.save_top_k best: averaging {n} needs "
            f"save_top_k >= {n} when the run trains (-1 keeps every evaluation's)")


def _differences(a: dict, b: dict, ignored: set) -> list[str]:
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted((set(a) | set(b)) - ignored) if a.get(k) != b.get(k)]


def check_compatible(first: Path, a: dict, other: Path, b: dict) -> None:
    """SetupError naming both checkpoints and what differs when their averages would mean nothing: another
    vocabulary (the CTC head's rows are other characters) or another architecture (wav2vec2_config, but for
    the training-only fields the run sets, `model.config`: dropouts, LayerDrop, SpecAugment), or other tensors."""
    va, vb = a["hyper_parameters"]["vocab"], b["hyper_parameters"]["vocab"]
    if va != vb:
        only_a, only_b = [t for t in va if t not in vb], [t for t in vb if t not in va]
        what = (f"{len(va)} vs {len(vb)} tokens; only in {first.name}: {' '.join(only_a) or '-'}; "
                f"only in {other.name}: {' '.join(only_b) or '-'}" if only_a or only_b
                else f"the same {len(va)} tokens in another order")
        raise SetupError(f"{first} and {other} have different vocabularies ({what}): their weights do not average")
    training_only = {*a["hyper_parameters"].get("config", {}), *b["hyper_parameters"].get("config", {}),
                     "transformers_version"}
    if differ := _differences(a["wav2vec2_config"], b["wav2vec2_config"], training_only):
        raise SetupError(f"{first} and {other} are different architectures (wav2vec2_config: {'; '.join(differ[:4])}"
                         f"{'; ...' if len(differ) > 4 else ''}): their weights do not average")
    base_a, base_b = (c.get("base") or {} for c in (a, b))  # adapters or LoRA: the frozen base they complete
    if base_a.get("hash") != base_b.get("hash"):
        raise SetupError(f"{first} and {other} complete different bases ({base_a.get('pretrained', 'none: full')} vs "
                         f"{base_b.get('pretrained', 'none: full')}): their weights do not average")
    sa, sb = a["state_dict"], b["state_dict"]
    shapes = [f"{k} {tuple(sa[k].shape) if k in sa else 'absent'} vs {tuple(sb[k].shape) if k in sb else 'absent'}"
              for k in sorted(set(sa) | set(sb)) if k not in sa or k not in sb or sa[k].shape != sb[k].shape]
    if shapes:
        raise SetupError(f"{first} and {other} hold different tensors ({'; '.join(shapes[:3])}"
                         f"{'; ...' if len(shapes) > 3 else ''}): their weights do not average")


def averaged(sources: list[Source]) -> dict:
    """One checkpoint of the mean of the sources' weights: the newest source's (highest update) with its
    state_dict replaced by the element-wise mean of every floating tensor (summed in float64, cast back to
    its dtype), the other tensors (integer buffers) the newest's; `averaged` records what was averaged. It keeps
    `KEPT` only: it is evaluated, transcribed and exported, not resumed. SetupError when the sources differ
    in vocabulary or architecture (`check_compatible`)."""
    if not sources:
        raise SetupError("nothing to average: give run= with best= or last=, or ckpts=[...]")
    newest = max(sources, key=lambda s: s.step)
    base = torch.load(newest.path, map_location="cpu", weights_only=True, mmap=True)
    sums: dict[str, torch.Tensor] = {}
    for s in sources:  # one checkpoint mapped at a time: memory for the float64 sums and one model
        state = torch.load(s.path, map_location="cpu", weights_only=True, mmap=True)
        check_compatible(newest.path, base, s.path, state)
        for key, tensor in state["state_dict"].items():
            if tensor.is_floating_point():
                if key in sums:
                    sums[key] += tensor.double()
                else:
                    sums[key] = tensor.to(torch.float64, copy=True)
    weights = {key: (sums[key] / len(sources)).to(tensor.dtype) if key in sums else tensor
               for key, tensor in base["state_dict"].items()}
    record = [{**asdict(s), "path": str(s.path.absolute())} for s in sources]
    return {**{k: base[k] for k in KEPT if k in base}, "state_dict": weights, "averaged": record}


def write(checkpoint: dict, out: str | Path) -> Path:
    """`checkpoint` written to `out`, atomically (a kill leaves the previous file or none)."""
    out = Path(out).expanduser()
    checkpoints.AtomicCheckpointIO().save_checkpoint(checkpoint, out)
    return out


class AverageBest(L.Callback):
    """callbacks.average: at the end of a completed run (`asr.run.training.conclude`), the `best` checkpoints by
    dev CER averaged into checkpoints/average-best<N>.ckpt, which is scored on the whole dev split beside the
    best single checkpoint, the same way (`asr.run.evaluation.dev_rates`): results.json's `average`. `best`
    None: off. It needs callbacks.checkpoint.save_top_k >= best (`check_kept`, when the run is assembled)."""

    def __init__(self, best: int | None):
        if best is not None and best < 1:
            raise SetupError(f"callbacks.average.best={best}: give the number of checkpoints to average, or null")
        self.best = best

    def conclude(self, run_dir: Path, best_single: str, data, device) -> dict:
        """Average, score, and what results.json records; when the run kept fewer checkpoints than `best` (it
        evaluated fewer times), a warning and {"skipped": why}: the run itself is complete."""
        try:
            sources = chosen(run_dir, best=self.best)
        except SetupError as error:
            log.warning("callbacks.average: %s", error)
            return {"skipped": str(error)}
        out = write(averaged(sources), run_dir / "checkpoints" / f"average-best{self.best}.ckpt")
        mean = dev_rates(inference.from_checkpoint(out), data, device)
        single = dev_rates(inference.from_checkpoint(best_single), data, device)
        log.warning("dev CER %.4f (WER %.4f) for the average of the %d best checkpoints (%s), %.4f (WER %.4f) for "
                    "the best one (%s)", mean["cer"], mean["wer"], len(sources), out.name, single["cer"],
                    single["wer"], Path(best_single).name)
        # the corpora of data.corpora: each one's dev figures too, as validation logs them (val/<name>/cer)
        corpora = {name: {"val_wer": wer, "val_cer": cer, "best_single_val_wer": single["by_corpus"][name][0],
                          "best_single_val_cer": single["by_corpus"][name][1]}
                   for name, (wer, cer) in mean["by_corpus"].items()
                   if name in data.shown and name in single["by_corpus"]}
        return {"checkpoint": str(out), "checkpoints": [{**asdict(s), "path": str(s.path)} for s in sources],
                "val_cer": mean["cer"], "val_wer": mean["wer"], "best_single_checkpoint": str(best_single),
                "best_single_val_cer": single["cer"], "best_single_val_wer": single["wer"],
                **({"corpora": corpora} if corpora else {})}


def check_kept(callbacks: dict) -> None:
    """SetupError at the start of a run whose callbacks.average.best asks for more checkpoints than
    callbacks.checkpoint keeps (its save_top_k; -1 keeps all)."""
    best = (callbacks.get("average") or {}).get("best")
    if not best:
        return
    kept = (callbacks.get("checkpoint") or {}).get("save_top_k", 0)
    if kept != -1 and kept < best:
        raise SetupError(f"callbacks.average.best={best} averages the {best} best checkpoints, but "
                         f"callbacks.checkpoint.save_top_k={kept} keeps {kept}: add "
                         f"callbacks.checkpoint.save_top_k={best} (or -1: every evaluation's)")


