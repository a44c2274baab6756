"""A trained model as an HF directory that `Wav2Vec2ForCTC`, `Wav2Vec2Processor` and
`transformers.pipeline("automatic-speech-recognition")` load, or as an ONNX graph for onnxruntime (`asr.model.onnx`).

The command: `python -m asr.tools.export` (asr/tools/).
"""

import json
from pathlib import Path

from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

from asr import SetupError
from asr.core import audio, outputs, text
from asr.model import finetune as tuning
from asr.model import onnx
from asr.model.lm import beam_decoder
from asr.model.module import CTCModel


def processor(vocab_json: str | Path, target_lang: str | None = None) -> Wav2Vec2Processor:
    """The feature extractor and tokenizer matching our data pipeline and vocabulary (`target_lang`'s of a
    nested {lang: vocabulary} file)."""
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=audio.SAMPLE_RATE, padding_value=0.0,
        do_normalize=True,  # zero mean, unit variance per utterance, as asr.core.audio.normalize
        return_attention_mask=True,  # XLS-R (layer-norm feature encoder) is trained with masks
    )
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_json), unk_token=text.UNK, pad_token=text.PAD,
                                     word_delimiter_token=text.WORD_DELIMITER,
                                     bos_token=None, eos_token=None,  # CTC labels have no sentence marks
                                     target_lang=target_lang)
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def save_processor(out_dir: Path, target_lang: str | None = None) -> Wav2Vec2Processor:
    """The processor of `out_dir`'s vocab.json (`target_lang`'s of a nested one) saved beside it."""
    both = processor(out_dir / "vocab.json", target_lang)
    both.save_pretrained(out_dir)  # processor_config.json, tokenizer files (transformers 5)
    both.feature_extractor.save_pretrained(out_dir)  # preprocessor_config.json, as older releases expect
    return both


def export(model: CTCModel, out_dir: str | Path, lm_path: str | Path | None = None, alpha: float | None = None,
           beta: float | None = None, *, format: str, quantize: str | None = None,
           target_lang: str | None = None, overwrite: bool, source: str | Path | None) -> Path:
    """config.json, model.safetensors, vocab.json, tokenizer and feature-extractor configs, and asr.json
    (the text rules, `language`, that transcripts follow: `asr.core.text.normalize`, and decode.pause_seconds).
    With `lm_path`, the Wav2Vec2ProcessorWithLM layout too (alphabet.json, language_model/ with the KenLM model,
    `alpha` and `beta`, which it then needs): transformers' ASR pipeline then decodes by beam search with the LM.
    format=onnx: model.onnx (`asr.model.onnx.export`; with quantize=int8 model.int8.onnx too) in place of config.json
    and model.safetensors.
    A model of MMS adapters (finetune=adapters, format=hf) is written in the MMS layout (`export_adapters`), under
    `target_lang` (None: its text rules' language); a LoRA model (finetune=lora) as a plain Wav2Vec2ForCTC with
    the LoRA updates merged, and peft's adapter files in lora/. `source` (the checkpoint) is recorded for each
    language of an MMS directory; `overwrite` replaces a language it holds already. Each file is written whole
    and renamed into `out_dir` (`asr.core.outputs.staged`); the directory's other files stay."""
    out_dir = Path(out_dir)
    method = model.finetune_method
    if method == "adapters" and format == "hf":
        if lm_path is not None:
            raise SetupError("lm_path with an adapters model: one LM per language is not written yet; export "
                             "without lm_path and decode with evaluate.py decoder=beam_lm lm_path=<arpa>")
        return export_adapters(model, out_dir, target_lang, overwrite=overwrite, source=source)
    if target_lang is not None:
        raise SetupError(f"target_lang={target_lang} names the language of an adapters model (finetune=adapters); "
                         f"this model is finetune={method}")
    with outputs.staged(out_dir) as staging:
        write_model(model, staging, lm_path, alpha, beta, format, quantize)
    return out_dir


def write_model(model: CTCModel, out_dir: Path, lm_path: str | Path | None, alpha: float | None,
                beta: float | None, format: str, quantize: str | None) -> None:
    """`export`'s files of a model of one language into the (new) directory `out_dir`."""
    if format == "onnx":
        onnx.export(model, out_dir, quantize)
    elif model.finetune_method == "lora":
        tuning.without_lora(model.model, merge=True).save_pretrained(out_dir)
        tuning.lora_files(model.model, model.hparams.finetune, model.base["pretrained"], out_dir / "lora")
    else:
        model.model.save_pretrained(out_dir)
    model.vocab.save(out_dir / "vocab.json")
    both = save_processor(out_dir)
    (out_dir / "asr.json").write_text(json.dumps({"language": model.hparams.language,
                                                  "pause_seconds": model.hparams.pause_seconds}))
    if lm_path is not None:
        from transformers import Wav2Vec2ProcessorWithLM

        decoder = beam_decoder(model.vocab.tokens, lm_path, alpha, beta)
        with_lm = Wav2Vec2ProcessorWithLM(feature_extractor=both.feature_extractor, tokenizer=both.tokenizer,
                                          decoder=decoder)
        with_lm.save_pretrained(out_dir)
        # transformers' pipeline attaches the decoder when the feature extractor's config names the
        # processor class, as releases before 5 wrote it; 5 saves it beside, where the pipeline does not look
        named = {"processor_class": "Wav2Vec2ProcessorWithLM"}
        preprocessor, nested = out_dir / "preprocessor_config.json", out_dir / "processor_config.json"
        preprocessor.write_text(json.dumps({**json.loads(preprocessor.read_text()), **named}, indent=2))
        config = json.loads(nested.read_text())
        nested.write_text(json.dumps({**config, "feature_extractor": {**config["feature_extractor"], **named}},
                                     indent=2))


def adapters_clash(out_dir: Path, lang: str, source: str | Path | None, overwrite: bool) -> None:
    """SetupError when the MMS directory `out_dir` holds `lang`'s adapters already and not `overwrite`, naming the
    checkpoint each came from (asr.json records it per language; older exports did not)."""
    rules_file = out_dir / "asr.json"
    languages = (json.loads(rules_file.read_text()).get("adapters") or {}) if rules_file.is_file() else {}
    if lang not in languages or overwrite:
        return
    earlier = languages[lang].get("checkpoint", "a checkpoint it did not record")
    raise SetupError(f"out={out_dir} holds the adapters of target_lang={lang} already, exported from {earlier}; "
                     f"this export is of {source}: give another target_lang= (or out=), or overwrite=true to "
                     f"replace them")


def export_adapters(model: CTCModel, out_dir: Path, target_lang: str | None, *, overwrite: bool,
                    source: str | Path | None) -> Path:
    """The MMS layout (facebook/mms-1b-all's) of a model of attention adapters: the base's weights with
    `adapter_attn_dim` in config.json (model.safetensors holds the first language's adapters and head),
    adapter.<lang>.safetensors per language (its adapters and CTC head: `Wav2Vec2ForCTC.load_adapter`), and
    vocab.json as the tokenizer's nested {lang: vocabulary}. `Wav2Vec2ForCTC.from_pretrained(out_dir,
    target_lang=<lang>, ignore_mismatched_sizes=True)` loads a language. A directory that has a language
    already gains this one when its base is the same (asr.json holds the base's hash, and per language the
    checkpoint, `source`, it came from); SetupError otherwise, and for a language it holds already unless
    `overwrite` (`adapters_clash`)."""
    from safetensors.torch import save_file

    lang = target_lang or model.hparams.language
    if not lang:
        raise SetupError("the model's text rules name no language: give target_lang=<code> (MMS uses ISO 639-3)")
    rules_file = out_dir / "asr.json"
    rules = json.loads(rules_file.read_text()) if rules_file.is_file() else None
    if rules is not None and "adapters" not in rules:
        raise SetupError(f"{out_dir} holds a model without adapters: export the adapters to another directory")
    if rules is not None and rules["base_hash"] != model.base["hash"]:
        raise SetupError(f"{out_dir} holds adapters of another base ({rules['base']}, sha256 "
                         f"{rules['base_hash'][:12]}) "
                         f"than this model's ({model.base['pretrained']}, sha256 {model.base['hash'][:12]}): a "
                         f"directory serves the languages of one base")
    adapters_clash(out_dir, lang, source, overwrite)
    vocab_file = out_dir / "vocab.json"
    vocabularies = json.loads(vocab_file.read_text(encoding="utf-8")) if rules and rules["adapters"] else {}
    with outputs.staged(out_dir) as staging:
        if rules is None:
            model.model.save_pretrained(staging)
            rules = {"base": model.base["pretrained"], "base_hash": model.base["hash"], "adapters": {}}
        adapters = {name: tensor.detach().cpu().contiguous() for name, tensor in model.model._get_adapters().items()}
        save_file(adapters, staging / f"adapter.{lang}.safetensors")
        vocabularies[lang] = model.vocab.ids
        (staging / "vocab.json").write_text(json.dumps(vocabularies, ensure_ascii=False, indent=1), encoding="utf-8")
        save_processor(staging, target_lang=lang)
        rules["adapters"][lang] = {"language": model.hparams.language, "pause_seconds": model.hparams.pause_seconds,
                                   **({"checkpoint": str(source)} if source is not None else {})}
        (staging / "asr.json").write_text(json.dumps(rules, indent=1))
    return out_dir


