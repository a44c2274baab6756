"""The LightningModule: an HF Wav2Vec2ForCTC encoder with its CTC head, trained with AdamW."""

from pathlib import Path

import lightning as L
import torch
from torchmetrics.text import CharErrorRate, WordErrorRate
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
from transformers.modeling_outputs import CausalLMOutput

from asr import SetupError, schedules, text
from asr.text import Vocabulary


def check_pretrained(pretrained: str | None) -> str | None:
    """Why `pretrained` cannot load (with the override that fixes it), or None. Fails in seconds offline."""
    if pretrained is None or Path(pretrained).is_dir():
        return None
    if Path(pretrained).exists() or pretrained.startswith((".", "/", "~")):
        return f"model.pretrained={pretrained} is not a model directory (config.json and weights)."
    try:  # in the local HF cache?
        Wav2Vec2Config.from_pretrained(pretrained, local_files_only=True)
        return None
    except OSError:
        pass
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:  # one quick probe of the hub, without transformers' retries
        get_hf_file_metadata(hf_hub_url(pretrained, "config.json"), timeout=5)
        return None
    except Exception as error:
        return (f"model.pretrained={pretrained} is neither a local directory nor in the HF cache, and the "
                f"hub cannot be reached ({type(error).__name__}). Download it where you have a network "
                f"(hf download {pretrained} --local-dir <dir>) and pass model.pretrained=<dir>, "
                f"or model.pretrained=null for random weights.")


def build_wav2vec2(vocab: Vocabulary, pretrained: str | None, arch: dict, config: dict,
                   attn_implementation: str) -> Wav2Vec2ForCTC:
    """`pretrained` (hub id or directory; its config.json fixes the architecture), or random weights
    shaped by `arch`; `config` (dropouts, LayerDrop, SpecAugment) overrides either."""
    config = dict(config, vocab_size=len(vocab), pad_token_id=vocab.blank_id,
                  ctc_loss_reduction="mean",  # per-utterance loss / label length, batch mean (HF recipe)
                  ctc_zero_infinity=True)  # an infeasible alignment gives 0, not inf
    if pretrained is None:
        return Wav2Vec2ForCTC._from_config(Wav2Vec2Config(**{**arch, **config}),
                                           attn_implementation=attn_implementation)
    try:  # a CTC head of another vocabulary is replaced (mismatched sizes); nothing else may mismatch
        return Wav2Vec2ForCTC.from_pretrained(pretrained, attn_implementation=attn_implementation,
                                              ignore_mismatched_sizes=True, **config)
    except OSError as error:
        raise SetupError(check_pretrained(pretrained) or str(error)) from error


class CTCModel(L.LightningModule):
    """Fine-tunes a wav2vec2 encoder with CTC; validation decodes greedily and scores WER and CER.

    vocab: tokens, id = index, last is the blank `[PAD]`. pretrained: hub id or directory, None for
    random weights. arch: Wav2Vec2Config architecture fields, used only for random weights (a
    pretrained model keeps its own). config: Wav2Vec2Config fields applied in both cases (dropouts,
    LayerDrop, SpecAugment). language: the text rules of `asr.text.normalize`, applied to hypotheses
    (zh-*: no space between Han characters) and deciding whether MER is scored.
    freeze_finetune_updates: for this many first optimizer updates only the CTC head learns, the
    encoder stays as pretrained (fairseq's `freeze_finetune_updates`). max_consecutive_skips: updates
    whose gradients are not finite are skipped (on every rank alike) and counted; after this many in a
    row the run stops (`stop_reason`). optim: lr, betas, eps, weight_decay, head_lr (the CTC head's own
    learning rate; None: lr), as `adamw` takes them. sched: name and options of a schedule in
    `asr.schedules`. All are plain values, so checkpoints load with `weights_only=True`. The defaults
    are in conf/ (train.yaml, model/, sched/).
    """

    def __init__(self, vocab: list[str], pretrained: str | None, arch: dict, config: dict, language: str | None,
                 freeze_feature_encoder: bool, freeze_finetune_updates: int, gradient_checkpointing: bool,
                 attn_implementation: str, max_consecutive_skips: int, optim: dict, sched: dict):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the logger gets the whole run config (train.py)
        self.vocab = Vocabulary(vocab)
        self.model = build_wav2vec2(self.vocab, pretrained, arch, config, attn_implementation)
        if freeze_feature_encoder:  # the convolutional waveform encoder keeps its pretrained weights
            self.model.freeze_feature_encoder()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.val_wer, self.val_cer = WordErrorRate(), CharErrorRate()
        # Mixed error rate (Mandarin by character, English by word): WER over `text.mixed_tokens`.
        self.val_mer = WordErrorRate() if text.is_chinese(language) else None
        self.skipped_updates, self.consecutive_skips = 0, 0
        self.stop_reason: str | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The full architecture, so a checkpoint rebuilds without the pretrained weights it started from.
        checkpoint["wav2vec2_config"] = self.model.config.to_dict()
        checkpoint["counters"] = {"skipped_updates": self.skipped_updates,
                                  "consecutive_skips": self.consecutive_skips}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("counters", {})
        self.skipped_updates = counters.get("skipped_updates", 0)
        self.consecutive_skips = counters.get("consecutive_skips", 0)

    @classmethod
    def from_config(cls, cfg, vocab: list[str]) -> "CTCModel":
        """The model of a checked train config (`asr.config.checked`) for `vocab`: the model node, with
        the text rules of the data and the optim and sched nodes passed at the call site."""
        from hydra.utils import instantiate

        return instantiate(cfg.model, vocab=vocab, language=cfg.data.language, optim=cfg.optim, sched=cfg.sched,
                           _convert_="all")

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location="cpu") -> "CTCModel":
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        hparams = dict(checkpoint["hyper_parameters"], pretrained=None, arch=checkpoint["wav2vec2_config"])
        model = cls(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
        return model

    def frames(self, samples) -> torch.Tensor:
        """(B,) encoder output frames of each utterance, from its samples (a host list or a tensor)."""
        return self.model._get_feat_extract_output_lengths(torch.as_tensor(samples))

    def forward(self, batch: dict) -> CausalLMOutput:
        """`.logits` (B, T, V), and `.loss` (`ctc_loss`) when the batch has labels."""
        if self._encoder_frozen_now():  # only the head learns: no graph through the encoder
            with torch.no_grad():
                hidden = self.model.wav2vec2(batch["audio"], attention_mask=batch["attention_mask"])[0]
            logits = self.model.lm_head(self.model.dropout(hidden))
        else:
            logits = self.model(batch["audio"], attention_mask=batch["attention_mask"]).logits
        if "labels" not in batch:
            return CausalLMOutput(logits=logits)
        return CausalLMOutput(loss=self.ctc_loss(logits, batch), logits=logits)

    def ctc_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """HF's CTC loss (float32, per-utterance loss / label length, batch mean, infeasible zeroed) from the
        `lengths` and `label_lengths` the collator counted on the host. No op here reads a value back from
        the device (no `.item()`, no data-dependent shape; tests/test_model.py counts them), where HF's
        `labels=` path has three (its `labels.max()` check, a `masked_select` of the labels, the lengths).
        torch's CUDA CTC kernel still copies the host lengths to the device itself; what that costs on a
        GPU is not measured here."""
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        with torch.backends.cudnn.flags(enabled=False):  # as HF: cuDNN's CTC has other length limits
            return torch.nn.functional.ctc_loss(
                log_probs, batch["labels"].clamp(min=0),  # -100 padding past each label length is not read
                self.frames(batch["lengths"]), torch.as_tensor(batch["label_lengths"]),  # host tensors
                blank=self.vocab.blank_id, reduction="mean", zero_infinity=True)

    def _encoder_frozen_now(self) -> bool:
        """In the first `freeze_finetune_updates` training updates of a single-process run. Under DDP the
        encoder's gradients are computed and dropped instead (`on_before_optimizer_step`): parameters
        without gradients would stall DDP's all-reduce."""
        return (self.training and self._trainer is not None and self.trainer.world_size == 1
                and self.global_step < self.hparams.freeze_finetune_updates)

    def transcribe(self, logits: torch.Tensor, frames: torch.Tensor) -> list[str]:
        """Greedy transcripts under the model's text rules. logits: (B, T, V); frames: (B,)."""
        return [text.normalize(h, self.hparams.language) for h in self.vocab.greedy_decode(logits, frames)]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if not batch["ids"]:  # no clip of the batch could be read (each logged and counted by the loader)
            return self.zero_loss()
        loss = self(batch).loss
        size = len(batch["ids"])
        self.log("train/loss", loss, batch_size=size, prog_bar=True)
        if batch["skipped"]:
            self.log("train/skipped_clips", float(batch["skipped"]), batch_size=size, reduce_fx="sum")
        return loss

    def zero_loss(self) -> torch.Tensor:
        """A loss of 0 with a (zero) gradient for every trainable parameter: a batch with no readable clip
        is a step like any other on every rank (skipping it on one rank would leave the others waiting in
        DDP's all-reduce), and it adds nothing to the update."""
        return sum((p * 0).sum() for p in self.parameters() if p.requires_grad)

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if not batch["ids"]:  # no clip of the batch could be read (logged by the loader)
            return
        out = self(batch)
        hypotheses = self.transcribe(out.logits, self.frames(batch["lengths"]))
        self.val_wer.update(hypotheses, batch["texts"])
        self.val_cer.update(hypotheses, batch["texts"])
        size = len(batch["ids"])
        self.log("val/loss", out.loss, batch_size=size, sync_dist=True)
        self.log("val/wer", self.val_wer, batch_size=size)
        self.log("val/cer", self.val_cer, batch_size=size, prog_bar=True)
        if self.val_mer is not None:
            self.val_mer.update([" ".join(text.mixed_tokens(h)) for h in hypotheses],
                                [" ".join(text.mixed_tokens(r)) for r in batch["texts"]])
            self.log("val/mer", self.val_mer, batch_size=size)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer update, gradients complete (accumulated, all-reduced, unscaled under fp16),
        before clipping: skip a non-finite update, hold the encoder during `freeze_finetune_updates`."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        # One host sync per update (GradScaler makes the same one); any rank's verdict is every rank's.
        skip = self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(norm).item(), all=False)
        if skip:
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
            self.skipped_updates += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.hparams.max_consecutive_skips:
                self.stop_reason = (f"{self.consecutive_skips} updates in a row had non-finite gradients (up to "
                                    f"update {self.global_step}); lower optim.lr, use precision=bf16 or 32, or "
                                    f"check the data report; the run stopped.")
                self.trainer.should_stop = True
        else:
            self.consecutive_skips = 0
        self.log_dict({"train/skipped_updates": float(self.skipped_updates)}, on_step=True, on_epoch=False)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)  # a device tensor: read when logged
        if self.global_step < self.hparams.freeze_finetune_updates:
            for p in self.model.wav2vec2.parameters():  # the encoder; lm_head (the CTC head) learns
                p.grad = None

    def configure_optimizers(self):
        optimizer = adamw(self.model, **self.hparams.optim)
        scheduler = schedules.build(optimizer, int(self.trainer.estimated_stepping_batches), **self.hparams.sched)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adamw(model: Wav2Vec2ForCTC, lr: float, betas: list[float], eps: float, weight_decay: float,
          head_lr: float | None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the CTC head (`lm_head`) at `head_lr` (None: `lr`). As the HF
    Trainer, no weight decay on biases and layer-norm gains (1-D tensors)."""
    head = {id(p) for p in model.lm_head.parameters()}
    groups = []
    for is_head in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head) == is_head]
        group_lr = (head_lr or lr) if is_head else lr
        groups += [{"params": [p for p in params if p.ndim >= 2], "lr": group_lr, "weight_decay": weight_decay},
                   {"params": [p for p in params if p.ndim < 2], "lr": group_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
