"""The network's encoder pass: HF's own, from host lengths, reading nothing back from the device."""

import numpy as np
import torch

from asr.core.frames import WAV2VEC2
from tests.conftest import assembled, attention_mask
from tests.test_model import DeviceReads


def _model_and_batch(cv_corpus, *overrides):
    from asr.data import loading
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "logger=none", *overrides)
    dataset = loading.UtteranceDataset(run.data.load("train"), run.data.vocab)
    return run.model, loading.collate([dataset[i] for i in range(4)], hop=WAV2VEC2.hop)


def test_our_encoder_pass_is_hfs_with_spec_augment_and_reads_nothing_back(cv_corpus):
    """In training, with time and channel masks: the same hidden states as Wav2Vec2Model.forward from the same
    numpy state; HF's reads the lengths back and masks by boolean indexing, ours does neither."""
    model, batch = _model_and_batch(cv_corpus, "model.config.mask_time_prob=0.3", "model.config.mask_time_length=2",
                                    "model.config.mask_feature_prob=0.2", "model.config.mask_feature_length=4")
    model.train()
    np.random.seed(3)
    with DeviceReads() as ours_mode:
        ours, _ = model.model.encode(batch["audio"], batch["lengths"])
    np.random.seed(3)
    with DeviceReads() as hf_mode:
        theirs = model.model.wav2vec2(batch["audio"],
                                      attention_mask=attention_mask(batch["lengths"], batch["shape"][1]))[0]
    assert ours_mode.reads == []
    assert hf_mode.reads  # its lengths' .tolist() and the boolean-mask assignment
    torch.testing.assert_close(ours, theirs)
    np.random.seed(4)  # another draw masks other frames: the masks were applied
    assert not torch.allclose(model.model.encode(batch["audio"], batch["lengths"])[0], ours)


def test_a_base_loads_in_one_line_and_transformers_report_shows_only_a_real_loss(tmp_path, caplog):
    """A new CTC head and new adapters are what fine-tuning adds: one line of ours, not transformers' LOAD REPORT
    ("MISSING ... Consider training", "MISMATCH Reinit"). A base that lacks a weight the model needs gets the
    report, as before."""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import Wav2Vec2Config

    from asr.core.text import Vocabulary
    from asr.model.encoder import SyncFreeWav2Vec2ForCTC, build_wav2vec2

    base = tmp_path / "base"
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2), vocab_size=10,
                            do_stable_layer_norm=True, feat_extract_norm="layer", num_conv_pos_embeddings=16)
    SyncFreeWav2Vec2ForCTC._from_config(config).save_pretrained(base)
    vocab = Vocabulary([*"abcde", "|", "[UNK]", "[PAD]"])  # 8 tokens: the base's head has 10
    shown = []  # what transformers' logger emits (it does not propagate to the root logger caplog reads)
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="asr.model.encoder"):
            build_wav2vec2(vocab, str(base), {}, {"adapter_attn_dim": 16}, "sdpa", "normal")
        assert not any("LOAD REPORT" in message for message in shown)
        assert caplog.messages == [f"model.pretrained={base}: every weight of the base loaded; a new CTC head and "
                                   f"new adapters to train"]
        weights = load_file(base / "model.safetensors")
        del weights["wav2vec2.encoder.layers.1.feed_forward.output_dense.weight"]
        save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
        build_wav2vec2(vocab, str(base), {}, {}, "sdpa", "normal")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    (report,) = [message for message in shown if "LOAD REPORT" in message]
    assert "layers.1.feed_forward.output_dense.weight | MISSING" in report
