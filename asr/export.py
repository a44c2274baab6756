"""A trained model as an HF directory that `Wav2Vec2ForCTC` and `Wav2Vec2Processor` load."""

from pathlib import Path

from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

from asr import audio, text
from asr.model import CTCModel


def processor(vocab_json: str | Path) -> Wav2Vec2Processor:
    """The feature extractor and tokenizer matching our data pipeline and vocabulary."""
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=audio.SAMPLE_RATE, padding_value=0.0,
        do_normalize=True,  # zero mean, unit variance per utterance, as asr.audio.normalize
        return_attention_mask=True,  # XLS-R (layer-norm feature encoder) is trained with masks
    )
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_json), unk_token=text.UNK, pad_token=text.PAD,
                                     word_delimiter_token=text.WORD_DELIMITER,
                                     bos_token=None, eos_token=None)  # CTC labels have no sentence marks
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def export(model: CTCModel, out_dir: str | Path) -> Path:
    """config.json, model.safetensors, vocab.json, tokenizer and feature-extractor configs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(out_dir)
    model.vocab.save(out_dir / "vocab.json")
    both = processor(out_dir / "vocab.json")
    both.save_pretrained(out_dir)  # processor_config.json, tokenizer files (transformers 5)
    both.feature_extractor.save_pretrained(out_dir)  # preprocessor_config.json, as older releases expect
    return out_dir
