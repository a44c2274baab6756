"""Several processes, nodes and clusters: the batch per update on any number of GPUs, the launcher's
allocation checked against the config, and requeue on SLURM's warning signal (checkpoints written
atomically, and which one a run resumes from: `asr.core.checkpoints`).
(One-time data work done once over ranks: `asr.data.cache.one_at_a_time`, held by the datamodule's setup.)

Who owns the signal: this module's `Requeue` callback. SLURM sends a signal before a job's time limit
(`--signal=USR1@90`) or when it is preempted (`scancel --signal=USR1`). Lightning's own SLURM handler
saves its checkpoint inside the signal handler, wherever the step happens to be (between two
micro-batches of an accumulated update, whose gradients a checkpoint does not hold) and starts a
collective save from it; submitit's handler (USR2) requeues without any checkpoint. `Requeue` only
notes the signal; at the end of an update every rank agrees (under DDP an all-reduce of a host flag over
a CPU (gloo) group, started at one update and read at the next: the GPUs never wait for it), the run saves an
exact-resume checkpoint, rank 0 requeues the job, and the requeued job resumes from that checkpoint. Lightning's handler
is switched off (`plugins`), submitit's is left alone on its own signal.
"""

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from asr import SetupError, slurm_job_id
from asr.core.checkpoints import REQUEUE_CHECKPOINT, AtomicCheckpointIO

log = logging.getLogger(__name__)
_SIGNALS = signal.Signals  # Requeue's argument `signal` shadows the module


def batch_per_update(update_clips: int | None, update_seconds: float | None, accumulate: int,
                     max_batch_size: int | None, max_batch_seconds: float, world_size: int) -> dict:
    """What one optimizer update trains on, over all processes and accumulated batches.

    A recipe states its total (`update_clips`: clips, as the HF cards' total_train_batch_size; or
    `update_seconds`: padded audio-seconds) and the accumulation follows from the world size; without
    either, `accumulate` (trainer.accumulate_grad_batches) is taken as given and the total grows with the
    world size. Returns {accumulate, world_size, clips (None without a clip cap), seconds, text}.
    """
    if update_clips and update_seconds:
        raise SetupError(f"update_clips={update_clips} and update_seconds={update_seconds}: set one of them.")
    stated = ("update_clips", update_clips, max_batch_size, "data.max_batch_size", "clips") if update_clips else \
        ("update_seconds", update_seconds, max_batch_seconds, "data.max_batch_seconds", "s") if update_seconds else None
    if stated:
        key, total, per_batch, batch_key, unit = stated
        if accumulate != 1:
            raise SetupError(f"{key}={total} and trainer.accumulate_grad_batches={accumulate}: the accumulation "
                             f"follows from {key}; drop trainer.accumulate_grad_batches.")
        if not per_batch:
            raise SetupError(f"{key}={total} needs {batch_key} (the {unit} of one batch).")
        ratio = total / (per_batch * world_size)
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
            raise SetupError(f"{key}={total} does not divide into {world_size} process(es) x {batch_key}="
                             f"{per_batch} {unit} per batch; choose a number of GPUs or a {batch_key} that "
                             f"divides {total}.")
        accumulate = round(ratio)
    clips = max_batch_size * accumulate * world_size if max_batch_size else None
    seconds = max_batch_seconds * accumulate * world_size
    per = f"{max_batch_size} clips" if max_batch_size else f"{max_batch_seconds:g} s of padded audio"
    total_text = (f"{clips} clips (up to {seconds:g} s of padded audio)" if clips
                  else f"up to {seconds:g} s of padded audio")
    text = (f"{total_text} per update = {per} per batch x {accumulate} accumulated x {world_size} "
            f"process{'es' if world_size > 1 else ''}")
    return {"accumulate": accumulate, "world_size": world_size, "clips": clips, "seconds": seconds, "text": text}


def batch_of(cfg) -> dict:
    """`batch_per_update` of a run config on the run's world size (the launcher's, else the trainer's): the one
    computation the trainer's accumulation, the logs, results.json and the model card all read."""
    return batch_per_update(cfg.update_clips, cfg.update_seconds, cfg.trainer.accumulate_grad_batches,
                            cfg.data.max_batch_size, cfg.data.max_batch_seconds,
                            world_size(cfg.trainer.devices, cfg.trainer.num_nodes))


def launched_by() -> tuple[str, int, int] | None:
    """(launcher, processes per node, nodes) of an external launcher (SLURM's srun, torchrun), or None
    when Lightning starts the processes itself. torchrun wins where both are present (as in Lightning)."""
    env = os.environ
    if TorchElasticEnvironment.detect():
        per_node = int(env.get("LOCAL_WORLD_SIZE", 1))
        return "torchrun (--nproc-per-node, --nnodes)", per_node, int(env.get("WORLD_SIZE", 1)) // per_node
    if SLURMEnvironment.detect():
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        return ("SLURM (--ntasks-per-node, --nodes)",
                int(per_node) if per_node else int(env["SLURM_NTASKS"]) // nodes, nodes)
    return None


def check_allocation(devices, num_nodes: int) -> None:
    """SetupError, naming both numbers, when an external launcher started another number of processes per
    node or nodes than trainer.devices / trainer.num_nodes say."""
    launched = launched_by()
    if launched is None:
        return
    launcher, per_node, nodes = launched
    if (isinstance(devices, int) and devices > 0 and devices != per_node) or num_nodes != nodes:
        raise SetupError(f"{launcher} started {per_node} process(es) per node on {nodes} node(s), but "
                         f"trainer.devices={devices} and trainer.num_nodes={num_nodes}: pass "
                         f"trainer.devices={per_node} trainer.num_nodes={nodes} (one process per GPU), "
                         f"or change the allocation.")


def check_machine(trainer) -> None:
    """SetupError, with the override that works, for settings this machine cannot honour and that Lightning
    would otherwise swap silently: precision=16 without CUDA (Lightning trains in bf16 instead),
    trainer.devices > 1 without GPUs (Lightning starts that many CPU processes and multiplies the batch),
    unless trainer.accelerator=cpu asks for CPU processes; precision=bf16 on a GPU without bf16. `trainer`:
    the trainer node of a run config."""
    accelerator, devices, precision = str(trainer.accelerator), trainer.devices, str(trainer.precision)
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SetupError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: leave "
                         f"trainer.accelerator=auto (the CPU here) or run on a GPU node.")
    if precision.startswith("16") and not cuda:
        raise SetupError("precision=16 is fp16 mixed precision, which needs a CUDA GPU; this run would be on the "
                         "CPU, where Lightning trains in bf16 instead: give precision=bf16 or precision=32.")
    if precision.startswith("bf16") and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise SetupError(f"precision=bf16 needs a GPU with bf16 (Ampere or newer); {torch.cuda.get_device_name()} "
                         f"has none: give precision=16 (fp16 with loss scaling) or precision=32.")
    many = (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, tuple)) and len(devices) > 1)
    if many and accelerator == "auto" and not torch.cuda.is_available() and launched_by() is None:
        raise SetupError(f"trainer.devices={devices} counts GPUs, and this machine has none: give trainer.devices=1, "
                         f"or trainer.accelerator=cpu to train in {devices} CPU processes (DDP over gloo, "
                         f"{devices}x the batch per update unless update_clips/update_seconds fix it).")


def world_size(devices, num_nodes: int) -> int:
    """Processes of the run, from the config or, under srun/torchrun, from the launcher."""
    launched = launched_by()
    if launched is not None:
        return launched[1] * launched[2]
    if isinstance(devices, int) and devices > 0:
        return devices * num_nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * num_nodes
    return max(1, torch.cuda.device_count()) * num_nodes  # "auto" / -1: every visible GPU


def strategy(configured, layerdrop: float, world: int):
    """DDP that tolerates parameters without gradients when LayerDrop skips layers: a skipped layer gets
    no gradient on that rank, which plain DDP (find_unused_parameters=False) stops on."""
    if layerdrop > 0 and world > 1 and configured in ("auto", "ddp"):
        log.info("model.config.layerdrop=%s under DDP: strategy ddp_find_unused_parameters_true", layerdrop)
        return "ddp_find_unused_parameters_true"
    return configured


def plugins() -> list:
    """Atomic checkpoint writes always; under srun (not torchrun) the SLURM environment without Lightning's
    own requeue handler: `Requeue` owns the signal (module docstring)."""
    out = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        out.append(SLURMEnvironment(auto_requeue=False))
    return out


class Requeue(L.Callback):
    """On `signal` (SLURM's warning before the time limit or a preemption), at the end of the update in
    progress (under DDP, of the next one: the ranks agree on a host flag while it computes): save an exact-resume
    checkpoint (`dirpath`/requeue.ckpt: weights, optimizer, scaler, schedule, loader position, report and counters),
    requeue the SLURM job (`scontrol requeue`) and stop. train.py resumes from that checkpoint when it finds it in the
    run directory. Outside SLURM the run saves and stops the same way; running the same command again resumes it.

    `requeued` is then the job id (or "" outside SLURM), `saved` the checkpoint's path.
    """

    def __init__(self, signal: str, dirpath: str):
        name = f"SIG{signal.upper().removeprefix('SIG')}"
        if name not in _SIGNALS.__members__:
            raise SetupError(f"callbacks.requeue.signal={signal!r} is not a signal; give the one SLURM's "
                             f"--signal names, e.g. USR1.")
        self.signum = _SIGNALS[name]
        self.path = Path(dirpath) / REQUEUE_CHECKPOINT
        self.signalled = False
        self.saved: Path | None = None
        self.requeued: str | None = None
        self._step = -1
        self._previous = None
        self._group = None  # under DDP: a gloo group for the flag, so that agreeing never waits on a GPU
        self._flag = torch.zeros(1)
        self._reduction = None  # the all-reduce started at the previous update

    def listen(self) -> None:
        """Note the signal from now on (train.py calls this before reading data: a signal during start-up
        would otherwise kill the process, USR1's default action, and the job with it)."""
        if self._previous is None:
            self._previous = signal.signal(self.signum, self._on_signal)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.listen()
            if trainer.world_size > 1 and self._group is None:
                self._group = torch.distributed.new_group(backend="gloo")  # every rank calls it, in order

    def _any_rank_signalled(self) -> bool:
        """Whether any rank had been signalled by the previous update (one process: this update). Every rank
        gets the same answer at the same update; the host flag's all-reduce runs while the update computes."""
        if self._group is None:
            return self.signalled
        decided = False
        if self._reduction is not None:
            self._reduction.wait()
            decided = bool(self._flag.item())  # a host tensor: no device involved
        self._flag.fill_(float(self.signalled))
        self._reduction = torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX,
                                                       group=self._group, async_op=True)
        return decided

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self._reduction is not None:
            self._reduction.wait()  # every rank started it; leave none pending
            self._reduction = None
        if stage == "fit" and self._group is not None:
            if torch.distributed.is_initialized():  # its gloo threads gone before exit, not in a destructor
                torch.distributed.destroy_process_group(self._group)
            self._group = None
        if stage == "fit" and self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        log.warning("signal %s received: saving at the end of this update, then requeueing",
                    signal.Signals(signum).name)
        self.signalled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # within an accumulated update: gradients not in a checkpoint
            return
        self._step = trainer.global_step
        if not self._any_rank_signalled():
            return
        trainer.save_checkpoint(self.path)
        self.saved = self.path
        # The state is saved: the SIGTERM a requeue sends may end the process at once. (Lightning's own
        # SIGTERM handler would broadcast to ranks already gone and hold the job until SLURM's KillWait.)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        job = slurm_job_id()
        if job and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode:
                log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
                job = None
            else:
                log.warning("saved %s at update %d; requeued SLURM job %s", self.path, trainer.global_step, job)
        self.requeued = job or ""
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # no validation on stopping (Lightning's default): it is not in the checkpoint
