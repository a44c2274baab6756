"""The network: HF's Wav2Vec2ForCTC (its modules and weights, unchanged) with an encoder pass that never
reads a value back from the device. Plain `nn.Module` code; the trainer's side is `asr.model.module.CTCModel`.

HF's own pass reads the clip lengths back from the device twice per training step (SpecAugment's
`.tolist()` and boolean-index masking; transformers' attention-mask builder's `padding_mask.all()`).
Here the frame mask is made from the host lengths (samples) the collator counted, SpecAugment is drawn
from it on the host with HF's own `_compute_mask_indices` (the same numpy draws, so the same masks) and
applied with `torch.where`, and the transformer loop gets the attention mask the host already knows.

Under mixed precision a frozen convolutional feature encoder keeps its convolution weights in the compute
dtype (`keep_feature_encoder_in`): autocast would otherwise round the same frozen fp32 weights to bf16 or
fp16 again in every forward pass (frozen weights are not in autocast's cast cache), for the same result.
"""

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2EncoderStableLayerNorm, _compute_mask_indices

from asr import SetupError
from asr.core.frames import Geometry
from asr.core.text import Vocabulary


class _Frames:
    """A host frame mask as HF's `_compute_mask_indices` reads an attention mask (`.detach().sum(-1).tolist()`,
    its only use): the frame counts, without a torch tensor to read back."""

    def __init__(self, frame_mask: np.ndarray):
        self.counts = frame_mask.sum(-1).tolist()

    def detach(self):
        return self

    def sum(self, dim: int):
        return self

    def tolist(self) -> list[int]:
        return self.counts


class SyncFreeWav2Vec2ForCTC(Wav2Vec2ForCTC):
    """Wav2Vec2ForCTC (same modules, weights and config; HF's `forward` is left as it is) with `logits` and
    `encode` from host lengths. Saved with `save_pretrained`, it loads as HF's Wav2Vec2ForCTC. (The class
    name keeps "ForCTC": transformers picks HF's own `forward(labels=)` loss by it.)"""

    _feature_dtype: torch.dtype | None = None  # the conv weights' dtype when kept in the compute dtype

    def keep_feature_encoder_in(self, dtype: torch.dtype) -> list[str]:
        """The convolutions of the (frozen) feature encoder in `dtype`; float32 puts them back. Its layer norms
        stay float32, as autocast computes them. Under autocast to `dtype` the features are bit for bit
        those of float32 weights (autocast rounds them to `dtype` for every convolution); outside it (a
        forward pass not under the trainer's precision), the features are computed under autocast to `dtype`.
        Returns the names of the parameters cast (as in `state_dict`)."""
        names = []
        for name, module in self.wav2vec2.feature_extractor.named_modules():
            if isinstance(module, torch.nn.Conv1d):
                module.to(dtype)
                names += [f"wav2vec2.feature_extractor.{name}.{p}" for p, _ in module.named_parameters()]
        self._feature_dtype = None if dtype == torch.float32 else dtype
        return names

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, C, T) the convolutional feature encoder's output for `audio` (B, S)."""
        extractor = self.wav2vec2.feature_extractor
        if self._feature_dtype is None or torch.is_autocast_enabled(audio.device.type):
            return extractor(audio)
        with torch.autocast(audio.device.type, dtype=self._feature_dtype):
            return extractor(audio).float()

    @property
    def geometry(self) -> Geometry:
        """How the feature encoder turns samples into frames (`asr.core.frames`), from the config."""
        return Geometry.of(self.config)

    def frames(self, samples) -> torch.Tensor:
        """(B,) encoder output frames of each clip, from its samples (a host list or array): on the host."""
        return torch.from_numpy(np.asarray(self.geometry.frames(np.asarray(samples, dtype=np.int64)))).reshape(-1)

    def logits(self, audio: torch.Tensor, lengths, train_encoder: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, V) CTC logits of `audio` (B, S) samples at 16 kHz, `lengths` (B,) host samples per clip, and
        the (B,) frames of each clip, on the host. train_encoder=False: no graph through the encoder (only the
        head learns)."""
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            hidden, frames = self.encode(audio, lengths)
        return self.lm_head(self.dropout(hidden)), frames

    def encode(self, audio: torch.Tensor, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's hidden states (B, T, H), and the (B,) frames of each clip on the host: HF's
        `Wav2Vec2Model.forward` with its own modules, the frame mask from the host `lengths`. Equals
        `self.wav2vec2(audio, attention_mask=...)` from the same numpy random state (tests/test_encoder.py)."""
        wav2vec2 = self.wav2vec2
        features = self.features(audio).transpose(1, 2)
        frames = self.frames(lengths)  # host lengths, host frames
        frame_mask = np.arange(features.shape[1])[None, :] < frames.numpy()[:, None]  # (B, T), numpy: on the host
        hidden, _ = wav2vec2.feature_projection(features)
        hidden = self._spec_augment(hidden, frame_mask)
        mask = None if frame_mask.all() else torch.from_numpy(frame_mask).to(hidden.device, non_blocking=True)
        return self.transformer(hidden, mask), frames

    def transformer(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """HF's `Wav2Vec2EncoderStableLayerNorm.forward` (XLS-R's pre-norm transformer) with its own modules,
        given the attention mask it would build from `mask` (B, T), the clips' frames; None: no padding, no
        mask is passed, so SDPA may take its fastest kernel. Other encoders run as HF's."""
        encoder = self.wav2vec2.encoder
        implementation = self.config._attn_implementation
        if not isinstance(encoder, Wav2Vec2EncoderStableLayerNorm) or implementation not in ("sdpa", "eager"):
            return encoder(hidden, attention_mask=mask)[0]
        attention = None
        if mask is not None:
            hidden = hidden.masked_fill(~mask[..., None], 0)  # padded frames are 0, as HF's
            keys = mask[:, None, None, :]  # (B, 1, 1, T): every query attends to the clip's frames
            attention = keys if implementation == "sdpa" else (~keys).to(hidden.dtype) * torch.finfo(hidden.dtype).min
        hidden = encoder.dropout(hidden + encoder.pos_conv_embed(hidden))
        for layer in encoder.layers:
            if self.training and self.config.layerdrop > 0 and torch.rand([]) < self.config.layerdrop:
                continue  # LayerDrop (a host draw, as HF's)
            hidden = layer(hidden, attention_mask=attention)
        return encoder.layer_norm(hidden)

    def _spec_augment(self, hidden: torch.Tensor, frame_mask: np.ndarray) -> torch.Tensor:
        """HF's SpecAugment (`Wav2Vec2Model._mask_hidden_states`) in training: time spans replaced by the
        learned mask embedding, feature channels zeroed; masks drawn on the host from `frame_mask`."""
        config = self.config
        if not self.training or not getattr(config, "apply_spec_augment", True):
            return hidden
        batch, length, size = hidden.shape
        if config.mask_time_prob > 0:
            spans = _compute_mask_indices((batch, length), mask_prob=config.mask_time_prob,
                                          mask_length=config.mask_time_length, attention_mask=_Frames(frame_mask),
                                          min_masks=config.mask_time_min_masks)
            spans = torch.from_numpy(spans).to(hidden.device, non_blocking=True)
            hidden = torch.where(spans[..., None], self.wav2vec2.masked_spec_embed.to(hidden.dtype), hidden)
        if config.mask_feature_prob > 0:
            channels = _compute_mask_indices((batch, size), mask_prob=config.mask_feature_prob,
                                             mask_length=config.mask_feature_length,
                                             min_masks=config.mask_feature_min_masks)
            hidden = hidden.masked_fill(torch.from_numpy(channels).to(hidden.device, non_blocking=True)[:, None], 0)
        return hidden

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As HF's Wav2Vec2ForCTC (config.json names that class): AutoModelForCTC and pipelines load it."""
        super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "config.json"
        config = json.loads(path.read_text())
        config["architectures"] = ["Wav2Vec2ForCTC"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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


HEAD_INITS = ("normal", "xavier")


def wav2vec2_config(pretrained: str | None, arch: dict) -> Wav2Vec2Config:
    """The architecture `build_wav2vec2` builds: `pretrained`'s config.json, or `arch` for random weights."""
    if pretrained is None:
        return Wav2Vec2Config(**arch)
    return Wav2Vec2Config.from_pretrained(pretrained)


log = logging.getLogger(__name__)

# What a base may lack without anything being lost: a new CTC head (another vocabulary), new adapters
# (finetune=adapters); and what it may hold that a CTC model does not use: XLS-R's pretraining quantiser and
# projections (Wav2Vec2ForPreTraining checkpoints).
NEW_WEIGHTS = re.compile(r"^lm_head\.|\.adapter_layer\.")
UNUSED_WEIGHTS = re.compile(r"^(quantizer|project_q|project_hid)\.")


@contextmanager
def _held_load_report():
    """transformers' LOAD REPORT (a warning of `transformers.modeling_utils`) held back; the list of the records
    held, for the caller to show when the load lost something."""
    held = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addFilter(hold)
    try:
        yield held
    finally:
        hf_logger.removeFilter(hold)


def report_load(pretrained: str, loading: dict, held: list) -> None:
    """One line of ours when a base loaded with only what is expected new (`NEW_WEIGHTS`) or unused
    (`UNUSED_WEIGHTS`); transformers' own report, held back while loading, when a weight the model needs was
    missing, did not fit, or the base held weights the model has no place for."""
    new = [k for k in loading["missing_keys"] if NEW_WEIGHTS.search(k)]
    new += [k for k, *_ in loading["mismatched_keys"] if k.startswith("lm_head.")]
    lost = ([k for k in loading["missing_keys"] if not NEW_WEIGHTS.search(k)]
            + [k for k, *_ in loading["mismatched_keys"] if not k.startswith("lm_head.")]
            + [k for k in loading["unexpected_keys"] if not UNUSED_WEIGHTS.match(k)])
    if lost:
        for record in held:
            logging.getLogger(record.name).handle(record)
        return
    parts = [*(["a new CTC head"] if any(k.startswith("lm_head.") for k in new) else []),
             *(["new adapters"] if any(".adapter_layer." in k for k in new) else [])]
    log.info("model.pretrained=%s: every weight of the base loaded%s", pretrained,
             f"; {' and '.join(parts)} to train" if parts else "")


def build_wav2vec2(vocab: Vocabulary, pretrained: str | None, arch: dict, config: dict,
                   attn_implementation: str, head_init: str) -> SyncFreeWav2Vec2ForCTC:
    """`pretrained` (hub id or directory; its config.json fixes the architecture), or random weights
    shaped by `arch`; `config` (dropouts, LayerDrop, SpecAugment) overrides either. A CTC head that is new
    (random weights, or a checkpoint without a head of this vocabulary) starts as `head_init` says:
    normal, HF's N(0, initializer_range) with bias 0; xavier, fairseq's Wav2VecCtc (Xavier uniform, bias 0),
    about 6x larger weights on a 128-wide encoder, so more of the loss's gradient reaches the encoder at
    the start. A head the checkpoint holds is kept."""
    if head_init not in HEAD_INITS:
        raise SetupError(f"model.head_init={head_init!r}: give one of {', '.join(HEAD_INITS)}.")
    config = dict(config, vocab_size=len(vocab), pad_token_id=vocab.blank_id,
                  ctc_loss_reduction="mean",  # per-utterance loss / label length, batch mean (HF recipe)
                  ctc_zero_infinity=True)  # an infeasible alignment gives 0, not inf
    if pretrained is None:
        model = SyncFreeWav2Vec2ForCTC._from_config(Wav2Vec2Config(**{**arch, **config}),
                                                    attn_implementation=attn_implementation)
        new_head = True
    else:
        try:  # a CTC head of another vocabulary is replaced (mismatched sizes); nothing else may mismatch
            with _held_load_report() as held:
                model, loading = SyncFreeWav2Vec2ForCTC.from_pretrained(
                    pretrained, attn_implementation=attn_implementation, ignore_mismatched_sizes=True,
                    output_loading_info=True, **config)
        except OSError as error:
            raise SetupError(check_pretrained(pretrained) or str(error)) from error
        report_load(pretrained, loading, held)
        new_head = "lm_head.weight" in {*loading["missing_keys"], *(key for key, *_ in loading["mismatched_keys"])}
    if model.config.add_adapter:  # HF's strided adapter after the transformer: frames asr.core.frames does not count
        raise SetupError(f"{pretrained} has add_adapter=true in its config.json; this framework trains the CTC head "
                         f"on the transformer's frames (add_adapter=false)")
    if new_head:
        init_head(model.lm_head, head_init)
    return model


def init_head(lm_head: torch.nn.Linear, head_init: str) -> None:
    """A new CTC head as `head_init` says: xavier, fairseq's (Xavier uniform, bias 0); normal, HF's, as built."""
    if head_init == "xavier":
        torch.nn.init.xavier_uniform_(lm_head.weight)
        torch.nn.init.zeros_(lm_head.bias)
