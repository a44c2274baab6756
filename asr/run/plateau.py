"""The CTC blank plateau: a run says when it is on it, and, past a share of its schedule, what to check.

A CTC model first learns to emit only the blank (every greedy transcript empty, dev CER 1.0) and leaves
that plateau later: after hundreds of updates for the tiny model, thousands for XLS-R. Whether a run is
merely early or broken (a wrong vocabulary, learning rate, labels longer than their frames, an encoder
that never unfreezes) shows in none of the scores; `PlateauWatch` names each of those with its value.
The shares it reads, `val/empty_hypotheses` and `val/blank_frames`, come from `CTCModel.validation_step`.
"""

import logging

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer

from asr.core import audio, text
from asr.data.listing import characters

log = logging.getLogger(__name__)

# Where runs left the plateau (first evaluation with dev CER < 0.9), as a share of their updates
# (docs/plateau.md): the XLS-R runs of the model cards the experiments reproduce and the tiny model's defaults on the
# generated corpora that nothing was tuned on.
TYPICAL = ("typical: XLS-R fine-tuning leaves it after 4-14% of its updates (model cards: 1,500 of 34,700, "
           "3,500 of 67,600, 200 of 1,400; card 001 never did, a failed run)")
TINY_TYPICAL = ("the tiny model trained from scratch with its defaults at update 150-250 on two generated "
                "corpora (6 runs of 900 or 1,500 updates; its default is 1,500)")


class PlateauWatch(L.Callback):
    """After each evaluation: while dev CER is at least `cer`, the run is on the blank plateau; the log says
    so once, with the dev shares of empty transcripts and blank frames and what is typical. Still there past
    `warn_after` of the schedule (updates done / the schedule's updates, or of trainer.max_time if that
    comes first), it logs the checks, each with its value, once. warn_after: a share in [0, 1]; null: never.

    hold_spec_augment: SpecAugment's time masks (model.config.mask_time_prob) start only once the run is off
    the plateau: true, false, or auto (true for a model trained from scratch, model.pretrained=null; a
    pretrained model, as the model cards' recipes, keeps its masks from the first update)."""

    def __init__(self, cer: float, warn_after: float | None, hold_spec_augment: bool | str):
        if hold_spec_augment not in (True, False, "auto"):
            raise ValueError(f"callbacks.plateau.hold_spec_augment={hold_spec_augment!r}: true, false or auto")
        self.cer, self.warn_after, self.hold_spec_augment = cer, warn_after, hold_spec_augment
        self.said = self.warned = False
        self.left_at: int | None = None  # the update of the first evaluation below `cer`
        self._held: float | None = None  # mask_time_prob while it is held at 0
        self._encoder_grad_norm = None  # of the last training batch (a device tensor), or None: no gradients

    def state_dict(self) -> dict:
        return {"said": self.said, "warned": self.warned, "left_at": self.left_at}

    def load_state_dict(self, state: dict) -> None:
        self.said, self.warned, self.left_at = state["said"], state["warned"], state["left_at"]

    def on_train_start(self, trainer, pl_module) -> None:
        hold = self.hold_spec_augment if self.hold_spec_augment != "auto" else pl_module.hparams.pretrained is None
        config = pl_module.model.config
        if hold and self.left_at is None and config.mask_time_prob > 0:
            self._held, config.mask_time_prob = config.mask_time_prob, 0.0
            if trainer.is_global_zero:
                log.info("SpecAugment's time masks (mask_time_prob %g) start once dev CER is below %g "
                         "(callbacks.plateau.hold_spec_augment=%s)", self._held, self.cer, self.hold_spec_augment)

    def _release(self, pl_module) -> bool:
        if self._held is not None:
            pl_module.model.config.mask_time_prob, self._held = self._held, None
            return True
        return False

    def on_train_end(self, trainer, pl_module) -> None:
        self._release(pl_module)  # the model leaves the run with its configured masks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning drops the gradients before each evaluation: the encoder's norm is taken here, on the
        # device (read only if the checks are logged), while they may still be needed.
        if self.left_at is None and not self.warned and self.warn_after is not None:
            grads = [p.grad for p in pl_module.model.wav2vec2.parameters() if p.grad is not None]
            self._encoder_grad_norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads
                                       else None)

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/cer" not in metrics or self.left_at is not None:
            return
        step, share = trainer.global_step, self.share(trainer)
        where = f"update {step} ({share:.0%} of the schedule)"
        if float(metrics["val/cer"]) < self.cer:
            self.left_at = step
            released = self._release(pl_module)  # SpecAugment from the next update on
            if (self.said or released) and trainer.is_global_zero:
                log.info("%s: off the CTC blank plateau (dev CER %.3f)%s", where, float(metrics["val/cer"]),
                         "; SpecAugment from here" if released else "")
            return
        state = (f"dev CER {float(metrics['val/cer']):.3f}, "
                 f"{float(metrics.get('val/empty_hypotheses', float('nan'))):.0%} of transcripts empty, "
                 f"{float(metrics.get('val/blank_frames', float('nan'))):.1%} of frames blank")
        typical = TYPICAL + (f", {TINY_TYPICAL}" if pl_module.hparams.pretrained is None else "") + " (docs/plateau.md)"
        first, self.said = not self.said, True
        if self.warn_after is not None and share >= self.warn_after and not self.warned:
            # the checks, and only they, when the first evaluation is already past the share (a short run)
            self.warned = True
            if trainer.is_global_zero:
                log.warning("%s: %s the CTC blank plateau (%s). Check:\n%s", where, "on" if first else "still on",
                            state, "\n".join(f"- {check}"
                                              for check in checks(trainer, pl_module, self._encoder_grad_norm)))
        elif first and trainer.is_global_zero:
            late = (f"; past {self.warn_after:.0%} of the schedule the log will say what to check"
                    if self.warn_after is not None else "")
            log.warning("%s: on the CTC blank plateau (%s). Normal early in CTC training; %s%s.",
                        where, state, typical, late)

    @staticmethod
    def share(trainer) -> float:
        """How far the run is: updates done / the schedule's updates, or the share of trainer.max_time
        spent if that is larger (a wall-clock budget ends the run before its schedule does)."""
        share = trainer.global_step / max(1, trainer.estimated_stepping_batches)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer.time_remaining("train") is not None:
            spent = timer.time_elapsed("train")
            share = max(share, spent / max(1e-9, spent + timer.time_remaining("train")))
        return share


def checks(trainer, pl_module, encoder_grad_norm) -> list[str]:
    """What keeps a CTC model on the plateau when something is wrong, each with this run's value."""
    return [vocabulary_check(trainer.datamodule, pl_module.vocab), learning_rate_check(trainer, pl_module),
            feasibility_check(trainer.datamodule), encoder_check(pl_module, encoder_grad_norm)]


def vocabulary_check(datamodule, vocab: text.Vocabulary) -> str:
    """The vocabulary's size, its characters that no training transcript holds, and the dev characters
    outside it (scored as [UNK])."""
    specials = {text.WORD_DELIMITER, text.UNK, text.PAD}
    said = f"vocabulary: {len(vocab)} tokens"
    if datamodule is None or "train" not in getattr(datamodule, "utterances", {}):
        return said
    seen = {text.WORD_DELIMITER if c == " " else c for c in characters(datamodule.utterances["train"])}
    unseen = sorted(set(vocab.tokens) - specials - seen)
    said += f"; in no training transcript: {' '.join(unseen) if unseen else 'none'}"
    if "dev" in datamodule.report:
        said += f"; dev characters outside it: {datamodule.report['dev']['unk_characters']}"
    return said + " (a vocabulary of another corpus or language keeps every transcript out of reach)"


def learning_rate_check(trainer, pl_module) -> str:
    """The learning rates at this update against the peak (optim.lr, optim.head_lr)."""
    groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
    optim = pl_module.hparams.optim
    if not groups:
        return "learning rate: no optimizer"
    encoder, head = groups[0]["lr"], groups[-1]["lr"]
    said = f"learning rate: {encoder:.2e} now (peak optim.lr {float(optim['lr']):.2e})"
    if head != encoder or optim.get("head_lr"):
        said += f", CTC head {head:.2e} (optim.head_lr {optim.get('head_lr')})"
    return said + (f", schedule {pl_module.hparams.sched['name']} over {trainer.estimated_stepping_batches} "
                   f"updates (too low: the plateau lasts; too high: it may never leave)")


def feasibility_check(datamodule) -> str:
    """Clips whose labels are longer than their encoder frames (an infeasible CTC alignment: loss zeroed)."""
    if datamodule is None or "train" not in getattr(datamodule, "report", {}):
        return "labels longer than their frames: no data report"
    train = datamodule.report["train"]
    dropped = train["dropped"].get("transcript_longer_than_frames", 0)
    said = (f"labels longer than their frames: {dropped} training clips dropped of "
            f"{train['kept'] + sum(train['dropped'].values())} (data report: transcript_longer_than_frames)")
    if "dev" in datamodule.utterances:
        dev = datamodule.utterances["dev"]
        samples = (np.nan_to_num(dev.seconds) * audio.SAMPLE_RATE).astype(np.int64)
        said += f"; dev clips: {int((dev.column('frames') > datamodule.geometry.frames(samples)).sum())} of {len(dev)}"
    return said


def encoder_check(pl_module, grad_norm) -> str:
    """Whether the encoder learns: its trainable parameters, freeze_finetune_updates, and the gradient norm
    of its parameters in the last training batch (None: it had none)."""
    encoder = list(pl_module.model.wav2vec2.parameters())
    trainable = sum(p.numel() for p in encoder if p.requires_grad)
    norm = (f"gradient norm {float(grad_norm):.3g} in the last batch" if grad_norm is not None
            else "no gradients in the last batch")
    frozen = pl_module.hparams.freeze_finetune_updates
    held = (f"; model.freeze_finetune_updates={frozen} holds it until update {frozen}"
            if pl_module.global_step < frozen else "")
    return f"encoder: {trainable:,} of {sum(p.numel() for p in encoder):,} parameters trainable, {norm}{held}"
