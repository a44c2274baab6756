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
