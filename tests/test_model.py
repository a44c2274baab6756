import torch
from hydra.utils import instantiate
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

from tests.conftest import compose_config

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
    model = instantiate(cfg.model, vocab=VOCAB, optim=cfg.optim, sched=cfg.sched, _convert_="all").model
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2  # not xlsr_300m's arch
    assert model.config.layerdrop == 0.05
    assert model.lm_head.out_features == len(VOCAB)
    ours, theirs = model.wav2vec2.state_dict(), pretrained.wav2vec2.state_dict()
    for name in ("feature_extractor.conv_layers.0.conv.weight", "encoder.layers.1.attention.q_proj.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    assert not any(p.requires_grad for p in model.wav2vec2.feature_extractor.parameters())
