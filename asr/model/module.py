"""The LightningModule around the network (`asr.model.encoder.SyncFreeWav2Vec2ForCTC`): training and evaluation
steps, the CTC loss, WER/CER/MER, the guard against non-finite updates, AdamW and its schedule."""

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from asr import SetupError
from asr.core import text
from asr.core.frames import Geometry
from asr.core.text import Vocabulary
from asr.model import ctc, schedules, speed
from asr.model import finetune as tuning
from asr.model.encoder import SyncFreeWav2Vec2ForCTC, build_wav2vec2, init_head
from asr.model.metrics import CorpusErrors, ErrorRate, Share
from asr.model.speed import PRECISION_DTYPE, LateRead

COMPILE = {False: "false", True: "layers", "false": "false", "layers": "layers", "encoder": "encoder", "all": "all"}


@dataclass
class Output:
    """A forward pass: logits (B, T, V), the frames (B,) of each clip (host), the CTC loss when the batch had labels."""

    logits: torch.Tensor
    frames: torch.Tensor
    loss: torch.Tensor | None = None


def frames_of_pause(seconds: float | None, geometry: Geometry) -> int | None:
    """decode.pause_seconds in frames of `geometry`: a longer run of blank frames is a word boundary (None: none)."""
    return None if seconds is None else round(seconds / geometry.seconds_per_frame)


def certain_delimiter(size: int, delimiter: int) -> np.ndarray:
    """(size,) log-probabilities of a frame that is certainly a word delimiter, for the beam search: the
    delimiter at 0, every other token far below pyctcdecode's pruning threshold (-10)."""
    frame = np.full(size, -1000.0, dtype=np.float32)
    frame[delimiter] = 0.0
    return frame


@dataclass
class Decoded:
    """A batch as `CTCModel.decode` transcribed it: logits (B, T, V), frames (B,) of each clip, the greedy
    transcripts, and the decoder's (the greedy ones when decoding greedily); with a decoder, the frames of
    each word of its best beam, [(word, (first frame, frame after the last))] per clip (pyctcdecode's)."""

    logits: torch.Tensor
    frames: torch.Tensor
    greedy: list[str]
    hypotheses: list[str]
    word_frames: list[list[tuple[str, tuple[int, int]]]] | None = None


def decoded(logits: torch.Tensor, frames: torch.Tensor, vocab: Vocabulary, language: str | None,
            pause_frames: int | None, decoder=None, beam_width: int | None = None) -> Decoded:
    """The transcripts of logits (B, T, V) of clips of `frames` (B,) frames under the text rules of `language`
    (`asr.core.text.normalize`): greedy, and by `decoder` (`asr.model.lm.beam_decoder`) keeping `beam_width` beams
    (the tool's setting: conf/evaluate.yaml, conf/transcribe.yaml). A run of more than `pause_frames` blank frames
    (decode.pause_seconds) is a word boundary (`Vocabulary.paused`): in the greedy path, and for the beam search
    as frames of a certain word delimiter. `CTCModel.decoded`, and the ONNX model's (`asr.model.onnx.OnnxModel`)."""
    greedy = [text.normalize(h, language) for h in vocab.greedy_decode(logits, frames, pause_frames)]
    if decoder is None:
        return Decoded(logits, frames, greedy, greedy)
    if beam_width is None:
        raise ValueError("a beam decoder needs beam_width (conf/evaluate.yaml, conf/transcribe.yaml)")
    log_probs = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
    if pause_frames is not None and text.WORD_DELIMITER in vocab.ids:
        best = logits.argmax(dim=-1).cpu()
        delimiter = vocab.ids[text.WORD_DELIMITER]
        for row, n in enumerate(frames.tolist()):
            pause = ((vocab.paused(best[row, :n], pause_frames) == delimiter) & (best[row, :n] == vocab.blank_id))
            log_probs[row, :n][pause.numpy()] = certain_delimiter(log_probs.shape[-1], delimiter)
    # decode_beams, as Wav2Vec2ProcessorWithLM and the pipeline call it (decode() prunes history)
    beams = [decoder.decode_beams(lp[:n], beam_width=beam_width)[0] for lp, n in zip(log_probs, frames.tolist())]
    return Decoded(logits, frames, greedy, [text.normalize(b[0], language) for b in beams], [b[2] for b in beams])


class CTCModel(L.LightningModule):
    """Fine-tunes a wav2vec2 encoder with CTC; validation decodes greedily and scores WER and CER.

    vocab: tokens, id = index, last is the blank `[PAD]`. pretrained: hub id or directory, None for
    random weights. arch: Wav2Vec2Config architecture fields, used only for random weights (a
    pretrained model keeps its own). config: Wav2Vec2Config fields applied in both cases (dropouts,
    LayerDrop, SpecAugment). language: the text rules of `asr.core.text.normalize`, applied to hypotheses
    (zh-*: no space between Han characters) and deciding whether MER is scored.
    freeze_finetune_updates: for this many first optimizer updates only the CTC head learns, the
    encoder stays as pretrained (fairseq's `freeze_finetune_updates`). max_consecutive_skips: updates
    whose gradients are not finite are skipped (on every rank alike) and counted; after this many in a
    row the run stops (`stop_reason`; on a GPU the host learns of it a few updates late). compile: false;
    layers (torch.compile each transformer layer, dynamic shapes: one graph for every length); encoder (the
    convolutional feature encoder, static shapes: one graph per batch shape of the plan, which the
    warm-up builds before the first update); all (both). true means layers. expandable_segments: the CUDA
    allocator's (`asr.model.speed.configure_cuda_allocator`). optim: lr, betas, eps, weight_decay, head_lr (the CTC
    head's own learning rate; None: lr), fused, as `adamw` takes them. sched: name and options of a schedule in
    `asr.model.schedules`. All are plain values, so checkpoints load with `weights_only=True`. The defaults
    are in conf/ (train.yaml, model/, sched/).
    ctc_loss: torch's `ctc_loss` (torch), `asr.model.ctc`'s (tensor: no host sync on a GPU), or auto (tensor on
    CUDA, torch elsewhere). head_init: how a new CTC head starts (`build_wav2vec2`): normal or xavier.
    finetune: what trains (`asr.model.finetune`, conf/finetune/): method full, adapters (adapter_dim) or lora
    (rank, alpha, dropout, target_modules). With adapters or LoRA the base stays frozen and a checkpoint holds
    only what trains, with the base's path and hash (`on_save_checkpoint`); loading one loads the base first and
    refuses a base whose hash changed (`on_load_checkpoint`).
    """

    def __init__(self, vocab: list[str], pretrained: str | None, arch: dict, config: dict, language: str | None,
                 freeze_feature_encoder: bool, freeze_finetune_updates: int, gradient_checkpointing: bool,
                 attn_implementation: str, compile: bool | str, ctc_loss: str, max_consecutive_skips: int,
                 expandable_segments: bool, optim: dict, sched: dict, head_init: str, finetune: dict | None,
                 pause_seconds: float | None):
        finetune = tuning.check(dict(finetune or {"method": "full"}))
        if pause_seconds is not None and not pause_seconds > 0:
            raise SetupError(f"decode.pause_seconds={pause_seconds}: give the seconds of blank frames that end a word "
                             f"(above 0), or null for no such rule")
        super().__init__()
        self.save_hyperparameters(logger=False)  # the logger gets the whole run config (train.py)
        self.vocab = Vocabulary(vocab)
        self.model = build_wav2vec2(self.vocab, pretrained, arch, {**config, **tuning.config_overrides(finetune)},
                                    attn_implementation, head_init)
        if freeze_feature_encoder:  # the convolutional waveform encoder keeps its pretrained weights
            self.model.freeze_feature_encoder()
        tuning.prepare(self.model, finetune, pretrained or "the random base (model.pretrained=null)")
        if finetune["method"] == "adapters":  # init_adapter_layers made a new head (HF's normal one)
            init_head(self.model.lm_head, head_init)
        # What a checkpoint holds: every weight (full), or what trains, beside the base's identity
        self.base = None if finetune["method"] == "full" else {"pretrained": pretrained,
                                                                "hash": tuning.base_hash(self.model)}
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        speed.configure_cuda_allocator(expandable_segments)  # the model is built before CUDA starts
        compiled = COMPILE.get(compile, compile)
        if compiled not in COMPILE.values():
            raise SetupError(f"model.compile={compile!r}: give false, layers, encoder or all.")
        if compiled in ("layers", "all"):  # regional: each transformer layer (SpecAugment, drawn on the host, eager)
            for layer in self.model.wav2vec2.encoder.layers:
                layer.compile(dynamic=True)  # one graph for every length
        if compiled in ("encoder", "all"):  # its layer norms and transposes fused, per batch shape
            # One graph per (clips, samples) shape (asr.data.batching: num_buckets + 1 per split), in training
            # and in evaluation mode: more than dynamo's default of 8 recompiles before it falls back to eager.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
            self.model.wav2vec2.feature_extractor.compile(dynamic=False)
        self._kept_in_compute_dtype: list[str] = []  # feature encoder parameters cast for the fit
        # Mixed error rate (Mandarin by character, English by word): edits over `text.mixed_tokens`.
        self.val_mer = ErrorRate("mer") if text.is_chinese(language) else None
        # The CTC blank plateau (asr.run.plateau): dev clips whose greedy transcript is empty, dev frames whose
        # best token is the blank.
        self.val_empty_hypotheses, self.val_blank_frames = Share(), Share()
        self._skipped_before, self.consecutive_skips = 0, 0  # from a checkpoint
        self._skips: torch.Tensor | None = None  # on the device: [skipped since the start, skipped in a row]
        self._host_skips: LateRead | None = None
        self.stop_reason: str | None = None
        # The run's corpora, {name: {language, dev_seconds}} from the data module (`setup`; without one, a corpus
        # of the model's own text rules), and an evaluation's WER and CER counts per corpus (equal to jiwer's).
        self.corpora: dict[str, dict] = {"": {"language": language, "dev_seconds": 0.0}}
        self.shown: set[str] = set()  # the corpora whose dev figures are logged on their own (data.corpora)
        self._dev_errors: CorpusErrors | None = None

    def setup(self, stage: str) -> None:
        """Each corpus's dev split is scored on its own, under its own text rules (`SpeechDataModule.scoring`)."""
        data = self.trainer.datamodule
        if data is not None and hasattr(data, "scoring"):
            self.corpora, self.shown = data.scoring(), set(data.shown)

    def on_fit_start(self) -> None:
        """Under mixed precision, a frozen feature encoder's convolutions in the compute dtype for the fit
        (`SyncFreeWav2Vec2ForCTC.keep_feature_encoder_in`): no cast of their weights in any step."""
        precision = str(self.trainer.precision)
        if self.hparams.freeze_feature_encoder and precision.endswith("-mixed"):
            self._kept_in_compute_dtype = self.model.keep_feature_encoder_in(PRECISION_DTYPE[precision])

    def on_fit_end(self) -> None:
        if self._kept_in_compute_dtype:  # float32 again for export and evaluation (the values stay rounded)
            self.model.keep_feature_encoder_in(torch.float32)
            self._kept_in_compute_dtype = []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for name in self._kept_in_compute_dtype:  # checkpoints hold float32 weights, as ever
            key = f"model.{name}"
            checkpoint["state_dict"][key] = checkpoint["state_dict"][key].float()
        # The full architecture, so a checkpoint rebuilds without the pretrained weights it started from.
        checkpoint["wav2vec2_config"] = self.model.config.to_dict()
        checkpoint["counters"] = {"skipped_updates": self.skipped_updates,
                                  "consecutive_skips": int(self._skips[1]) if self._skips is not None
                                  else self.consecutive_skips}
        if self.base is not None:  # the frozen base stays out: its path and hash say which it is
            trainable = {f"model.{name}" for name in tuning.trainable_names(self.model)}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            checkpoint["base"] = dict(self.base)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of adapters or LoRA completed with this model's base (loaded from the base's path) once
        its hash is the checkpoint's; a checkpoint of another `finetune` method refused, naming both."""
        theirs = (checkpoint["hyper_parameters"].get("finetune") or {"method": "full"})["method"]
        ours = self.finetune_method
        if theirs != ours:
            raise SetupError(f"the checkpoint was trained with finetune={theirs}, this run has finetune={ours}: "
                             f"resume it with finetune={theirs}, or start a new run from its export")
        if self.base is not None:
            written = checkpoint.get("base", {})
            if written.get("hash") != self.base["hash"]:
                raise SetupError(f"the checkpoint's base {written.get('pretrained')} (sha256 "
                                 f"{str(written.get('hash'))[:12]}) is not the base loaded now, "
                                 f"{self.base['pretrained']} "
                                 f"(sha256 {self.base['hash'][:12]}): its weights or config changed since")
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
        counters = checkpoint.get("counters", {})
        self._skipped_before = counters.get("skipped_updates", 0)
        self.consecutive_skips = counters.get("consecutive_skips", 0)
        self._skips = None

    @classmethod
    def from_config(cls, cfg, vocab: list[str], language: str | None = None) -> "CTCModel":
        """The model of a checked train config (`asr.core.config.checked`) for `vocab`: the model node, with
        the text rules of the data (`language`: the data module's, where it differs from data.language: the
        first corpus's of data.corpora), the optim and sched nodes and decode.pause_seconds passed at the call
        site."""
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            return instantiate(cfg.model, vocab=vocab, language=language or cfg.data.language, optim=cfg.optim,
                               sched=cfg.sched, pause_seconds=cfg.decode.pause_seconds, _convert_="all")
        except InstantiationException as error:  # a setting the model refuses: its one line, not Hydra's wrapping
            if isinstance(error.__cause__, SetupError):
                raise error.__cause__ from None
            raise

    @property
    def finetune_method(self) -> str:
        """full, adapters or lora (`asr.model.finetune`; hparams hold the checked setting, full where none was
        given)."""
        return self.hparams.finetune["method"]

    @property
    def geometry(self) -> Geometry:
        """How the network's feature encoder turns samples into frames (`asr.core.frames`)."""
        return self.model.geometry

    def forward(self, batch: dict) -> Output:
        """`.logits` (B, T, V) with the `.frames` (B,) of each clip, and `.loss` (`ctc_loss`) when the batch has
        labels. The encoder pass reads nothing back from the device (`asr.model.encoder.SyncFreeWav2Vec2ForCTC`)."""
        logits, frames = self.model.logits(batch["audio"], batch["lengths"],
                                           train_encoder=not self._encoder_frozen_now())
        return Output(logits, frames, self.ctc_loss(logits, frames, batch) if "labels" in batch else None)

    def ctc_loss(self, logits: torch.Tensor, frames: torch.Tensor, batch: dict) -> torch.Tensor:
        """HF's CTC loss (float32, per-utterance loss / label length, batch mean, infeasible zeroed) from the
        host `frames` of each clip and the `label_lengths` the collator counted. No op here reads a value back
        from the device (no `.item()`, no data-dependent shape; tests/test_model.py counts them), where HF's
        `labels=` path has three (its `labels.max()` check, a `masked_select` of the labels, the lengths).
        torch's CUDA CTC kernel copies the host lengths to the device with blocking copies (6 syncs per
        update); `asr.model.ctc` (model.ctc_loss=tensor, or auto on CUDA) takes them on the device and has none."""
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        labels = batch["labels"].clamp(min=0)  # -100 padding past each label length is not read
        if ctc.use_tensor_ops(self.hparams.ctc_loss, logits.device):
            frames, label_lengths = ctc.to_device(frames, batch["label_lengths"], device=logits.device)  # one copy
            return ctc.ctc_loss(log_probs, labels, frames, label_lengths, blank=self.vocab.blank_id)
        with torch.backends.cudnn.flags(enabled=False):  # as HF: cuDNN's CTC has other length limits
            return torch.nn.functional.ctc_loss(
                log_probs, labels, frames, torch.as_tensor(batch["label_lengths"]),
                blank=self.vocab.blank_id, reduction="mean", zero_infinity=True)  # host tensors

    def _encoder_frozen_now(self) -> bool:
        """In the first `freeze_finetune_updates` training updates of a single-process run. Under DDP the
        encoder's gradients are computed and dropped instead (`on_before_optimizer_step`): parameters
        without gradients would stall DDP's all-reduce."""
        return (self.training and self._trainer is not None and self.trainer.world_size == 1
                and self.global_step < self.hparams.freeze_finetune_updates)

    def decode(self, batch: dict, decoder=None, beam_width: int | None = None) -> Decoded:
        """The model's transcripts of a collated batch (`asr.data.loading.collate`, on the host or the device):
        greedy, or by `decoder` (`asr.model.lm.beam_decoder`: CTC prefix beam search, with an n-gram LM if it has one)
        keeping `beam_width` beams. Validation, evaluate.py and the W&B predictions table all decode here,
        through the encoder pass that reads nothing back from the device (`forward`); the beam search runs on
        the host, one clip at a time, as transformers' Wav2Vec2ProcessorWithLM runs pyctcdecode."""
        out = self({"audio": batch["audio"].to(self.device, non_blocking=True), "lengths": batch["lengths"]})
        return self.decoded(out.logits, out.frames, decoder, beam_width)

    def decoded(self, logits: torch.Tensor, frames: torch.Tensor, decoder=None,
                beam_width: int | None = None) -> Decoded:
        """The transcripts of logits (B, T, V) of clips of `frames` (B,) frames: `decode`'s second half, for
        logits put together otherwise (transcribe.py joins a long file's windows)."""
        return decoded(logits, frames, self.vocab, self.hparams.language, self.pause_frames, decoder, beam_width)

    @property
    def pause_frames(self) -> int | None:
        """decode.pause_seconds in frames: a longer run of blank frames is a word boundary (None: no rule)."""
        return frames_of_pause(self.hparams.pause_seconds, self.geometry)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if not batch["ids"]:  # no clip of the batch could be read (each logged and counted by the loader)
            return self.zero_loss()
        loss = self(batch).loss
        size = len(batch["ids"])
        self.log("train/loss", loss, batch_size=size)  # not on the progress bar: it would read it every batch
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
        out = self.decode(batch)
        frames, hypotheses, loss = out.frames, out.hypotheses, self.ctc_loss(out.logits, out.frames, batch)
        self._count_per_corpus(batch, hypotheses)  # WER and CER, logged at the end of the evaluation
        blank = out.logits.argmax(dim=-1) == self.vocab.blank_id  # (B, T)
        valid = torch.arange(blank.shape[1], device=blank.device) < frames.to(blank.device)[:, None]
        self.val_blank_frames.update((blank & valid).sum(), valid.sum())  # over the clips' own frames
        self.val_empty_hypotheses.update(sum(not h for h in hypotheses), len(hypotheses))
        size = len(batch["ids"])
        self.log("val/loss", loss, batch_size=size, sync_dist=True)
        self.log("val/empty_hypotheses", self.val_empty_hypotheses, batch_size=size)
        self.log("val/blank_frames", self.val_blank_frames, batch_size=size)
        if self.val_mer is not None:
            self.val_mer.update(batch["texts"], hypotheses)
            self.log("val/mer", self.val_mer, batch_size=size)

    def _count_per_corpus(self, batch: dict, hypotheses: list[str]) -> None:
        """Adds a dev batch's edits and reference units to its clips' corpora (`CorpusErrors`)."""
        if self._dev_errors is None:
            self._dev_errors = CorpusErrors(self.corpora, ("wer", "cer"))
        self._dev_errors.update(batch, hypotheses)

    def on_validation_epoch_end(self) -> None:
        """val/wer and val/cer: the means of each corpus's dev WER and CER (counts summed over the ranks) weighted
        by its dev hours, the default model selection (callbacks.checkpoint.monitor); of one corpus, its own. With
        the corpora of data.corpora also val/<name>/wer and val/<name>/cer of each (`shown`). A corpus none of
        whose clips was scored (the sanity check's one batch) is left out of both."""
        errors = self._dev_errors or CorpusErrors(self.corpora, ("wer", "cer"))  # a rank that scored no clip
        self._dev_errors = None
        counts = self.trainer.strategy.reduce(errors.counts().to(self.device), reduce_op="sum").cpu()
        rates = errors.rates("dev_seconds", counts)
        for name, (wer, cer) in rates.get("by_corpus", {}).items():
            if name not in self.shown:
                continue
            self.log(f"val/{name}/wer", wer, sync_dist=False)
            self.log(f"val/{name}/cer", cer, sync_dist=False)
        if "cer" in rates:
            self.log("val/wer", rates["wer"], sync_dist=False)
            self.log("val/cer", rates["cer"], sync_dist=False, prog_bar=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer update, gradients complete (accumulated, all-reduced), before clipping: hold the
        encoder during `freeze_finetune_updates`, take the gradient norm (clipping reuses it), and skip an
        update whose gradients are not finite. Nothing here waits for the device: the fused AdamW skips the
        update on the device (its `found_inf`, as GradScaler uses it), the counters stay device tensors, and
        the host learns of a run of skips through `LateRead` (on a GPU some updates late)."""
        if self.global_step < self.hparams.freeze_finetune_updates:
            for p in self.model.wav2vec2.parameters():  # the encoder; lm_head (the CTC head) learns
                p.grad = None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # Lightning leaves a fused optimizer's unscaling to its step: clip unscaled
        self._with_grads = [p for p in self.parameters() if p.grad is not None]
        norms = torch._foreach_norm([p.grad for p in self._with_grads]) if self._with_grads else None
        self._grad_norm = (torch.linalg.vector_norm(torch.stack(norms)) if self._with_grads
                           else torch.zeros((), device=self.device))
        # All-reduced gradients are the same on every rank, so is this verdict: no reduction needed.
        nonfinite = (~torch.isfinite(self._grad_norm)).float()
        if self._skips is None:
            self._skips = torch.tensor([0.0, float(self.consecutive_skips)], device=self.device)
            self._host_skips = LateRead(self.device, 2)
        self._skips[0] += nonfinite
        self._skips[1] = (self._skips[1] + 1) * nonfinite  # updates skipped in a row
        if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: skipped on the device
            if scaler is None:  # (under fp16 GradScaler sets found_inf itself, from the same gradients)
                optimizer.found_inf = nonfinite
        elif nonfinite.item():  # optim.fused=false: one host sync per update
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
        self._host_skips.offer(self._skips)
        if (seen := self._host_skips.read()) is not None:
            in_a_row = int(seen[1])
            if in_a_row >= self.hparams.max_consecutive_skips and self.stop_reason is None:
                self.stop_reason = (f"{in_a_row} updates in a row had non-finite gradients (up to update "
                                    f"{self.global_step}); lower optim.lr, use precision=bf16 or 32, or check "
                                    f"the data report; the run stopped.")
                self.trainer.should_stop = True
        self.log("train/skipped_updates", self._skips[0] + self._skipped_before, on_step=True, on_epoch=False)
        self.log("train/grad_norm", self._grad_norm, on_step=True, on_epoch=False)  # device tensors: read when logged
        if scaler is not None:
            self.log("train/loss_scale", scaler._scale, on_step=True, on_epoch=False)  # GradScaler's (fp16)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip to `trainer.gradient_clip_val` by the norm `on_before_optimizer_step` took (Lightning's own
        clipping would compute it a second time)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        torch.nn.utils.clip_grads_with_norm_(self._with_grads, gradient_clip_val, self._grad_norm)  # parameters

    @property
    def skipped_updates(self) -> int:
        """Optimizer updates skipped for non-finite gradients over the run (reads the device)."""
        return self._skipped_before + (int(self._skips[0]) if self._skips is not None else 0)

    def configure_optimizers(self):
        optimizer = adamw(self.model, **self.hparams.optim)
        scheduler = schedules.build(optimizer, int(self.trainer.estimated_stepping_batches), **self.hparams.sched)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adamw(model: SyncFreeWav2Vec2ForCTC, lr: float, betas: list[float], eps: float, weight_decay: float,
          head_lr: float | None, fused: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the CTC head (`lm_head`) at `head_lr` (None: `lr`). As the HF
    Trainer, no weight decay on biases and layer-norm gains (1-D tensors). fused: torch's one-kernel
    implementation, which can also skip a non-finite update without the host's help."""
    head = {id(p) for p in model.lm_head.parameters()}
    groups = []
    for is_head in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head) == is_head]
        group_lr = (head_lr or lr) if is_head else lr
        groups += [{"params": [p for p in params if p.ndim >= 2], "lr": group_lr, "weight_decay": weight_decay},
                   {"params": [p for p in params if p.ndim < 2], "lr": group_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)
