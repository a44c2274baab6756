"""finetune=adapters (HF's MMS attention adapters) and finetune=lora (peft): what trains, what a checkpoint
holds, resuming on the same base only, the MMS export layout that transformers loads per language, LoRA
merged for pipeline(), and the errors."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import asr
import transcribe
from asr.core import audio, text
from asr.model import finetune as tuning
from asr.model import inference
from asr.model.module import CTCModel
from asr.tools import export as export_tool
from asr.tools import synth
from tests.conftest import assembled, compose_config, in_process
from tests.test_transcribe import assert_same_transcripts, audio_list

TRAIN = ("trainer.max_steps=2", "trainer.val_check_interval=2", "data.num_workers=0", "data.max_batch_seconds=20",
         "logger=none", "optim.lr=1e-9", "optim.head_lr=1e-9")  # near-random: long, varied transcripts to compare


def train(*overrides: str, check=True) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("-")]  # -m: before the overrides, as argparse takes it
    overrides = [o for o in overrides if not o.startswith("-")]
    result = subprocess.run([sys.executable, "train.py", *flags, *TRAIN, *overrides], cwd=asr.REPO_DIR,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def base(barely_trained, tmp_path_factory) -> Path:
    """A base to adapt: the barely trained run's export, copied (a test changes its weights)."""
    copy = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(barely_trained / "model", copy)
    return copy


@pytest.fixture(scope="module")
def es_corpus(tmp_path_factory) -> Path:
    """12 train, 4 dev, 4 test utterances of espeak Spanish in the Common Voice layout: a second language."""
    root = tmp_path_factory.mktemp("cv-es") / "es"
    sentences = synth.spanish_sentences(20, random.Random(3))
    voices = synth.ES_TRAIN_VOICES[:2]
    synth.write_common_voice(root, {"train": [(s, voices[i % 2]) for i, s in enumerate(sentences[:12])],
                                    "dev": [(s, synth.ES_DEV_VOICES[0]) for s in sentences[12:16]],
                                    "test": [(s, synth.ES_TEST_VOICES[0]) for s in sentences[16:]]}, locale="es")
    return root


@pytest.fixture(scope="module")
def runs(base, cv_corpus, es_corpus, tmp_path_factory) -> dict[str, Path]:
    """Runs of 2 updates from `base`: adapters for pt and es in one multirun, as the README runs it (one job per
    language, data.root by language), and LoRA for es (a vocabulary other than the base's)."""
    root = tmp_path_factory.mktemp("finetune")
    corpora = root / "corpora"
    corpora.mkdir()
    (corpora / "pt").symlink_to(cv_corpus)
    (corpora / "es").symlink_to(es_corpus)
    train("-m", "finetune=adapters", f"model.pretrained={base}", "lang=pt,es", f"data.root={corpora}/${{data.lang}}",
          f"hydra.sweep.dir={root}/adapters", "hydra.sweep.subdir=${data.lang}")
    train("finetune=lora", "lang=es", f"model.pretrained={base}", f"data.root={es_corpus}",
          f"hydra.run.dir={root}/lora")
    return {"pt": root / "adapters" / "pt", "es": root / "adapters" / "es", "lora": root / "lora"}


@pytest.mark.slow  # the module's runs: 3 trainings, about 45 s before the first test
def test_only_the_adapters_or_lora_and_the_head_train_and_the_checkpoint_holds_only_them(runs, barely_trained):
    full = torch.load(barely_trained / "checkpoints" / "last.ckpt", weights_only=True)
    for name, prefix in (("pt", "adapter_layer"), ("lora", "lora_")):
        ckpt = torch.load(runs[name] / "checkpoints" / "last.ckpt", weights_only=True)
        keys = set(ckpt["state_dict"])
        assert keys and all(prefix in k or k.startswith("model.lm_head.") for k in keys), sorted(keys)[:5]
        assert {"model.lm_head.weight", "model.lm_head.bias"} <= keys
        assert len(ckpt["base"]["hash"]) == 64 and ckpt["base"]["pretrained"].endswith("model")
        # the optimizer holds moments of what trains only
        moments = sum(s["exp_avg"].numel() for s in ckpt["optimizer_states"][0]["state"].values())
        assert moments == sum(t.numel() for t in ckpt["state_dict"].values())
        size = (runs[name] / "checkpoints" / "last.ckpt").stat().st_size
        assert size < 0.15 * (barely_trained / "checkpoints" / "last.ckpt").stat().st_size
        results = json.loads((runs[name] / "results.json").read_text())
        assert results["trainable_parameters"] == sum(t.numel() for t in ckpt["state_dict"].values())
        assert results["trainable_parameters"] < 0.1 * results["total_parameters"]
        assert results["checkpoint_bytes"] == Path(results["best_checkpoint"]).stat().st_size
    assert sum(t.numel() for t in full["state_dict"].values()) > 700_000  # the whole tiny model


@pytest.mark.slow  # the module's runs: 3 trainings, about 45 s before the first test
def test_a_checkpoint_loads_its_base_and_transcribes_as_the_run_left_it(runs, cv_corpus, tmp_path):
    ckpt = runs["pt"] / "checkpoints" / "last.ckpt"
    model = inference.from_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    run_dir = tmp_path / "eval"
    result = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={ckpt}", f"data.root={cv_corpus}", "split=dev",
                             "data.num_workers=0", f"hydra.run.dir={run_dir}"], cwd=asr.REPO_DIR, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "predictions.jsonl").is_file()


def hf_transcripts(model_dir: Path, lang: str, clips: list[Path]) -> list[str]:
    """Greedy transcripts by transformers alone: Wav2Vec2ForCTC with `lang`'s adapter, and its tokenizer."""
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    model = Wav2Vec2ForCTC.from_pretrained(str(model_dir), target_lang=lang, ignore_mismatched_sizes=True).eval()
    processor = Wav2Vec2Processor.from_pretrained(str(model_dir))
    processor.tokenizer.set_target_lang(lang)
    out = []
    for clip in clips:
        inputs = processor(audio.load(clip), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model(inputs.input_values).logits.argmax(-1)[0]
        out.append(text.normalize(processor.decode(ids), lang))
    return out


@pytest.mark.slow  # the module's runs: 3 trainings, about 45 s before the first test
def test_mms_export_serves_both_languages_in_transformers_and_transcribe(runs, cv_corpus, tmp_path):
    out = tmp_path / "mms"
    for lang in ("pt", "es"):
        result = in_process(export_tool.main, [f"ckpt_path={runs[lang] / 'checkpoints' / 'last.ckpt'}", f"out={out}"])
        assert result.returncode == 0, result.stderr
    assert {p.name for p in out.glob("adapter.*.safetensors")} == {"adapter.pt.safetensors", "adapter.es.safetensors"}
    assert set(json.loads((out / "vocab.json").read_text())) == {"pt", "es"}
    assert json.loads((out / "config.json").read_text())["adapter_attn_dim"] == 16
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:4]
    for lang in ("pt", "es"):
        ckpt = runs[lang] / "checkpoints" / "last.ckpt"
        expected = [json.loads(line)["text"] for line in in_process(transcribe.main, [
            f"model_path={ckpt}", audio_list(clips), "format=json", "batch_seconds=10"]).stdout.splitlines()]
        assert sum(map(len, expected)) > 10
        assert_same_transcripts(hf_transcripts(out, lang, clips), expected)
        served = in_process(transcribe.main, [f"model_path={out}", f"target_lang={lang}", audio_list(clips),
                                              "format=json", "batch_seconds=10"])
        assert served.returncode == 0, served.stderr
        assert_same_transcripts([json.loads(line)["text"] for line in served.stdout.splitlines()], expected)
    # the two languages differ: their adapters and heads are their own
    pt, es = (load_file(out / f"adapter.{lang}.safetensors") for lang in ("pt", "es"))
    vocabularies = json.loads((out / "vocab.json").read_text())
    assert pt.keys() == es.keys() and vocabularies["pt"] != vocabularies["es"]
    assert pt["lm_head.weight"].shape != es["lm_head.weight"].shape or not torch.equal(pt["lm_head.weight"],
                                                                                         es["lm_head.weight"])
    # a language it holds is replaced only with overwrite=true; the refusal names the checkpoint it came from
    rules = json.loads((out / "asr.json").read_text())
    ckpts = {lang: runs[lang] / "checkpoints" / "last.ckpt" for lang in ("pt", "es")}
    assert {lang: a["checkpoint"] for lang, a in rules["adapters"].items()} == {k: str(v) for k, v in ckpts.items()}
    again = in_process(export_tool.main, [f"ckpt_path={ckpts['pt']}", f"out={out}"])
    assert again.returncode == 1 and again.stderr.strip() == (
        f"error: out={out} holds the adapters of target_lang=pt already, exported from {ckpts['pt']}; this export is "
        f"of {ckpts['pt']}: give another target_lang= (or out=), or overwrite=true to replace them")
    assert in_process(export_tool.main, [f"ckpt_path={ckpts['pt']}", f"out={out}", "overwrite=true"]).returncode == 0
    # a directory serves one base: an export of adapters of another base into it is refused, overwrite or not
    (out / "asr.json").write_text(json.dumps({**rules, "base_hash": "0" * 64}))
    refused = in_process(export_tool.main, [f"ckpt_path={runs['es'] / 'checkpoints' / 'last.ckpt'}", f"out={out}",
                                            "overwrite=true"])  # which replaces a language, never the base
    assert refused.returncode == 1 and "holds adapters of another base" in refused.stderr
    missing = in_process(transcribe.main, [f"model_path={out}", "target_lang=ko", f"audio={clips[0]}"])
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1] == \
        f"error: target_lang=ko: {out} has adapters for pt, es only"
    unpicked = in_process(transcribe.main, [f"model_path={out}", f"audio={clips[0]}"])
    assert "pick one with target_lang=<lang>" in unpicked.stderr and len(unpicked.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # the module's runs: 3 trainings, about 45 s before the first test
def test_lora_exports_merged_for_pipeline_and_as_peft_files(runs, base, es_corpus, tmp_path):
    from peft import PeftModel
    from transformers import Wav2Vec2ForCTC, pipeline

    ckpt = runs["lora"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "lora"
    result = in_process(export_tool.main, [f"ckpt_path={ckpt}", f"out={out}"])
    assert result.returncode == 0, result.stderr
    clips = sorted((es_corpus / "clips").glob("*.mp3"))[:4]
    expected = [json.loads(line)["text"] for line in in_process(transcribe.main, [
        f"model_path={ckpt}", audio_list(clips), "format=json", "batch_seconds=10"]).stdout.splitlines()]
    assert sum(map(len, expected)) > 10
    pipe = pipeline("automatic-speech-recognition", model=str(out), device="cpu")
    assert_same_transcripts([text.normalize(pipe({"raw": audio.load(c), "sampling_rate": 16000})["text"], "es")
                             for c in clips], expected)
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    # peft's files on the base give the merged model's logits
    model = inference.from_checkpoint(ckpt)
    plain = Wav2Vec2ForCTC.from_pretrained(str(base), vocab_size=len(model.vocab), ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(plain, str(out / "lora")).eval()
    merged = Wav2Vec2ForCTC.from_pretrained(str(out)).eval()
    wave = torch.from_numpy(audio.normalize(audio.load(clips[0])))[None]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(wave).logits, merged(wave).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.model.eval()(wave).logits, merged(wave).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # the module's runs: 3 trainings, about 45 s before the first test
def test_resume_on_the_same_base_goes_on_another_base_or_method_stops(runs, base, cv_corpus, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["pt"], run_dir)
    train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_steps=3")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    other = train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_steps=4", "finetune=lora", check=False)
    assert other.returncode != 0
    assert "model.finetune" in other.stderr and "adapters" in other.stderr and "lora" in other.stderr
    # the base's weights change under the run: refused, naming both hashes
    changed = tmp_path / "base"
    shutil.copytree(base, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["base"]["pretrained"] = str(changed)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.raises(asr.SetupError, match=r"is not the base loaded now"):
        inference.from_checkpoint(tmp_path / "moved.ckpt")


def test_a_base_without_mms_layers_or_without_weights_stops_in_one_line(base, cv_corpus, tmp_path):
    post_norm = compose_config(overrides=["model.arch.do_stable_layer_norm=false", "model.arch.feat_extract_norm=group",
                                          "finetune=adapters"])
    tokens = ["a", "b", text.WORD_DELIMITER, text.UNK, text.PAD]
    with pytest.raises(asr.SetupError, match=r"no transformer layers in the MMS form .*Wav2Vec2EncoderLayer\b"):
        CTCModel.from_config(post_norm, tokens)
    result = train("finetune=adapters", f"data.root={cv_corpus}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0
    assert "finetune=adapters adapts a pretrained base" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(asr.SetupError, match=r"finetune=lora does not take model.finetune.adapter_dim"):
        tuning.check({"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"],
                       "adapter_dim": 16})


def test_the_encoder_pass_reads_nothing_back_from_the_device_with_adapters_or_lora(base):
    """As full fine-tuning (tests/test_model.py): no op of the training forward pass and loss reads a value back."""
    from tests.test_model import DeviceReads

    for method in ("adapters", "lora"):
        cfg = compose_config(overrides=[f"finetune={method}", f"model.pretrained={base}"])
        model = CTCModel.from_config(cfg, [*"abc", text.WORD_DELIMITER, text.UNK, text.PAD]).train()
        batch = {"audio": torch.randn(2, 16000), "lengths": [16000, 12000],
                 "labels": torch.tensor([[0, 1, 2], [1, 2, -100]]), "label_lengths": [3, 2]}
        with DeviceReads() as reads:
            loss = model(batch).loss
        assert reads.reads == [] and torch.isfinite(loss), method


def test_the_planners_arithmetic_counts_what_each_method_trains():
    """python -m asr.tools.memory states=true on the tiny model (128 wide, 3 layers, 40 tokens): an MMS adapter per
    layer is a layer norm (2 x 128), 128 -> 16 and 16 -> 128 with biases; the head 40 x 128 + 40."""
    from asr.tools import memory

    head = 40 * 128 + 40
    adapters = memory.model_states(compose_config(overrides=["finetune=adapters"]))
    assert adapters["trainable_parameters"] == 3 * (2 * 128 + 128 * 16 + 16 + 16 * 128 + 128) + head
    lora = memory.model_states(compose_config(overrides=["finetune=lora", "model.finetune.rank=4"]))
    # rank 4 on q, k, v, out (128 x 128: 4 x (128 + 128) each) and the feed-forward's 128 <-> 512 denses
    assert lora["trainable_parameters"] == 3 * (4 * 4 * 256 + 2 * 4 * (128 + 512)) + head
    full = memory.model_states(compose_config(overrides=[]))
    assert full["trainable_parameters"] == full["total_parameters"] == adapters["total_parameters"] - 3 * 4496
    assert adapters["adamw_gb"] == 8 * adapters["trainable_parameters"] / 1e9


@pytest.mark.slow  # the module's runs: 3 trainings, about 45 s before the first test
def test_onnx_exports_adapters_as_they_are_and_lora_merged(runs, cv_corpus, tmp_path):
    from asr.model.onnx import OnnxModel

    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:2]
    waves = [torch.from_numpy(audio.normalize(audio.load(c))) for c in clips]
    lengths = [len(w) for w in waves]
    batch = {"audio": torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), "lengths": lengths}
    for name in ("es", "lora"):
        ckpt = runs[name] / "checkpoints" / "last.ckpt"
        result = in_process(export_tool.main, [f"ckpt_path={ckpt}", f"out={tmp_path / name}", "format=onnx"])
        assert result.returncode == 0, result.stderr
        model = inference.from_checkpoint(ckpt).eval()
        with torch.no_grad():
            ours = model(batch)
        theirs = OnnxModel(tmp_path / name / "model.onnx")(batch)
        assert theirs.frames.tolist() == ours.frames.tolist()
        for i, n in enumerate(ours.frames.tolist()):
            torch.testing.assert_close(theirs.logits[i, :n], ours.logits[i, :n], atol=2e-4, rtol=1e-3)


def test_memory_states_true_prints_the_arithmetic_of_the_composed_run():
    from asr.tools import memory

    result = in_process(memory.main, ["states=true", "finetune=lora", "model.finetune.rank=4"])
    assert result.returncode == 0, result.stderr
    head = 40 * 128 + 40
    trainable = 3 * (4 * 4 * 256 + 2 * 4 * (128 + 512)) + head
    assert f"finetune=lora, {trainable:,} of " in result.stdout and "before activations" in result.stdout


@pytest.mark.parametrize("method,override,message", [
    ("lora", "model.finetune.rank=eight", "model.finetune.rank='eight': give a whole number of at least 1"),
    ("lora", "model.finetune.rank=0", "model.finetune.rank=0: give a whole number of at least 1"),
    ("adapters", "model.finetune.adapter_dim=0", "model.finetune.adapter_dim=0: give a whole number of at least 1"),
    ("adapters", "model.finetune.adapter_dim=2.5", "model.finetune.adapter_dim=2.5: give a whole number of at least 1"),
    ("lora", "model.finetune.dropout=1.5", "model.finetune.dropout=1.5: give a number from 0 to below 1"),
    ("lora", "model.finetune.alpha=-1", "model.finetune.alpha=-1: give a number above 0"),
    ("lora", "model.finetune.target_modules=[]", "model.finetune.target_modules=[]: give a list of module names"),
])
def test_finetune_settings_are_typed_before_any_data_or_weights_load(method, override, message, tmp_path):
    """A wrong finetune setting stops the run in its one line, before the data is read or the base loaded: the
    corpus and the base named here do not exist, and the error is only about the setting."""
    with pytest.raises(asr.SetupError) as error:
        assembled(f"finetune={method}", override, f"data.root={tmp_path / 'no-corpus'}",
                  f"model.pretrained={tmp_path / 'no-base'}", f"run_dir={tmp_path / 'run'}")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # the module's runs: 3 trainings, about 45 s before the first test
def test_a_checkpoint_whose_base_moved_is_pointed_at_its_new_place(runs, base, cv_corpus, tmp_path):
    """The base of an adapters checkpoint moved: transcribe.py and evaluate.py say so and take base=<new place>
    (its sha256 checked), and transcribe as before the move."""
    ckpt = runs["pt"] / "checkpoints" / "last.ckpt"
    clip = sorted((cv_corpus / "clips").iterdir())[0]
    before = in_process(transcribe.main, [f"model_path={ckpt}", f"audio={clip}"])
    moved = tmp_path / "moved"
    base.rename(moved)
    try:
        lost = in_process(transcribe.main, [f"model_path={ckpt}", f"audio={clip}"])
        found = in_process(transcribe.main, [f"model_path={ckpt}", f"audio={clip}", f"base={moved}"])
        scored = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={ckpt}", f"data.root={cv_corpus}",
                                 f"base={moved}", "split=dev", "data.num_workers=0", f"hydra.run.dir={tmp_path}/eval"],
                                cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=300)
    finally:
        moved.rename(base)
    assert before.returncode == 0 and before.stdout.strip()
    assert lost.returncode == 1 and "(if it moved: base=<where it is now>)" in lost.stderr
    assert found.returncode == 0 and found.stdout == before.stdout
    assert scored.returncode == 0, scored.stderr[-2000:]
    full = in_process(transcribe.main, [f"model_path={runs['pt'] / 'model'}", f"audio={clip}", f"base={moved}"])
    assert full.returncode == 1 and "base= is for checkpoints of adapters or LoRA" in full.stderr
