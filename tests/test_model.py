import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

from asr.model import CTCModel
from tests.conftest import assembled, compose_config

VOCAB = list("abc") + ["|", "[UNK]", "[PAD]"]


def test_pretrained_directory_keeps_its_architecture_and_weights(tmp_path):
    """An XLS-R-style pretraining checkpoint (no CTC head) loads from a local directory: its own
    architecture and weights, our regularisation overrides, a new CTC head of our vocabulary size."""
    arch = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=[16] * 7, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    pretrained = Wav2Vec2ForPreTraining(arch)
    pretrained.save_pretrained(tmp_path / "xlsr")
    cfg = compose_config(overrides=["model=xlsr_300m", f"model.pretrained={tmp_path / 'xlsr'}",
                                    "model.config.layerdrop=0.05"])
    model = CTCModel.from_config(cfg, VOCAB).model
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2  # not xlsr_300m's arch
    assert model.config.layerdrop == 0.05
    assert model.lm_head.out_features == len(VOCAB)
    ours, theirs = model.wav2vec2.state_dict(), pretrained.wav2vec2.state_dict()
    for name in ("feature_extractor.conv_layers.0.conv.weight", "encoder.layers.1.attention.q_proj.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    assert not any(p.requires_grad for p in model.wav2vec2.feature_extractor.parameters())


class DeviceReads(TorchDispatchMode):
    """The ops dispatched while active that read tensor values back to the host: on a GPU each one waits
    for the device (`.item()`, `bool()`, `tolist()` and data-dependent shapes such as `masked_select`)."""

    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal",
             "aten::unique_consecutive", "aten::_unique2"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_our_ctc_loss_equals_hf_and_reads_nothing_back_from_the_device(cv_corpus):
    """The loss computed from the collator's host lengths is HF's own (labels= path), and its gradients
    too; ours dispatches no op that reads a value back from the device, HF's does."""
    from asr import data as asr_data
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "model.config.mask_time_prob=0", "logger=none")
    model = run.model.eval()
    dataset = asr_data.UtteranceDataset(run.data.load("train"), run.data.vocab)
    batch = asr_data.collate([dataset[i] for i in range(4)])
    batch["labels"][0, 3:] = -100  # an utterance whose label is shorter
    batch["label_lengths"][0] = 3
    logits = model(batch).logits
    with DeviceReads() as ours_mode:
        ours = model.ctc_loss(logits, batch)
        grad_ours = torch.autograd.grad(ours, model.model.lm_head.weight, retain_graph=True)[0]
    assert ours_mode.reads == []
    with DeviceReads() as hf_mode:
        theirs = model.model(batch["audio"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert "aten::masked_select" in hf_mode.reads and "aten::_local_scalar_dense" in hf_mode.reads
    torch.testing.assert_close(ours, theirs)
    grad_theirs = torch.autograd.grad(theirs, model.model.lm_head.weight)[0]
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert model.frames(batch["lengths"]).tolist() == [asr_data.audio.encoder_frames(n) for n in batch["lengths"]]
