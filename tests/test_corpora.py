"""Each release layout, generated in a temp dir with espeak-ng speech and planted defects, read into the
same records; dev carved by speaker; the duration and decode caches; the data report of a real run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import asr
from asr import SetupError
from asr.core import audio
from asr.core.frames import WAV2VEC2
from asr.data import corpora
from asr.tools import synth
from tests.conftest import data_module

KOREAN = ["안녕하세요", "감사합니다", "오늘 날씨가 좋네요", "학교에 갑니다", "밥을 먹었어요", "책을 읽어요"]
# ASCEND-like code-switching: (transcription, language tag)
ASCEND = [("我想要一杯咖啡", "zh"), ("this is very good", "en"), ("我们的 meeting 开始了", "mixed"),
          ("今天天气很好", "zh"), ("see you tomorrow", "en"), ("我觉得 ok 没问题", "mixed")]


def session_cache() -> str:
    """The test session's data.cache_dir (conftest's `_cache_dir`)."""
    return os.environ["ASR_CACHE_DIR"]


def korean(sentence: str) -> np.ndarray:
    return synth.speak(sentence, synth.Voice("ko", 170, 50), sample_rate=16_000)


@pytest.fixture(scope="module")
def zeroth_openslr(tmp_path_factory) -> Path:
    """4 train speakers x 3 clips, 1 test speaker x 2 clips."""
    root = tmp_path_factory.mktemp("zeroth")
    train = [(f"10{s}", KOREAN[(s + n) % 6], korean(KOREAN[(s + n) % 6])) for s in range(4) for n in range(3)]
    test = [("200", s, korean(s)) for s in KOREAN[:2]]
    synth.write_zeroth(root, {"train_data_01": train, "test_data_01": test})
    return root


def test_zeroth_openslr_layout_reads_and_carves_dev_by_speaker(zeroth_openslr):
    train = corpora.read_split("zeroth", str(zeroth_openslr), "train", "ko", cache_dir=session_cache())
    assert len(train) == 12 and train[0].id == "100_003_0000" and train[0].speaker == "100"
    assert train[0].text == KOREAN[0] and Path(train[0].path).is_file() and train[0].language == "ko"
    rest, dev = corpora.carve_dev(train, 1)
    assert {u.speaker for u in dev} == {corpora.carve_dev(train.select(slice(None, None, -1)), 1)[1][0].speaker}
    assert len(dev) == 3 and not {u.speaker for u in dev} & {u.speaker for u in rest}
    with pytest.raises(SetupError, match="dev_split=null"):
        corpora.read_split("zeroth", str(zeroth_openslr), "dev", "ko", cache_dir=session_cache())
    data = data_module("lang=ko", f"data.root={zeroth_openslr}", "data.dev_speakers=1", "data.num_workers=1")
    assert len(data.load("train")) == 9 and len(data.load("dev")) == 3 and len(data.load("test")) == 2
    assert {u.id for u in data.load("train")}.isdisjoint(u.id for u in data.load("dev"))
    assert "감" in data.vocab.tokens and data.report["train"]["dropped"] == {}


@pytest.mark.parametrize("layout", ["save_to_disk", "hub"])
def test_zeroth_hub_copy_through_datasets(tmp_path, layout):
    rows = [{"id": f"10{s}_003_000{n}", "speaker_id": 100 + s, "chapter_id": 3, "path": f"10{s}_003_000{n}.flac",
             "audio": {"bytes": synth.wav_bytes(np.random.default_rng(n).normal(0, 0.1, 8000 + 800 * n)),
                       "path": f"10{s}_003_000{n}.flac"},
             "text": KOREAN[n]} for s in range(2) for n in range(2)]
    synth.write_hf_dataset(tmp_path / "zeroth", {"train": rows, "test": rows[:1]}, layout)
    utts = corpora.read_split("zeroth", str(tmp_path / "zeroth"), "train", "ko", cache_dir=tmp_path / "cache")
    assert [u.id for u in utts] == [r["id"] for r in rows] and utts[3].speaker == "101"
    assert utts[1].text == KOREAN[1] and utts[1].duration is None
    assert len(audio.load(utts[1].path)) == 8800  # the embedded bytes, written once to a file
    assert Path(utts[1].path).is_relative_to(tmp_path / "cache")
    stamp = os.stat(utts[1].path).st_mtime_ns
    corpora._open_dataset.cache_clear()
    again = corpora.read_split("zeroth", str(tmp_path / "zeroth"), "train", "ko", cache_dir=tmp_path / "cache")
    assert list(again) == list(utts) and os.stat(utts[1].path).st_mtime_ns == stamp  # not written twice


@pytest.fixture(scope="module")
def ascend_rows() -> dict[str, list[dict]]:
    voice = synth.Voice("cmn", 175, 50)  # cmn reads Latin words as English, as code-switched speech
    rows = {}
    for split, picks in {"train": range(6), "validation": [0, 1, 2], "test": [3, 4, 5]}.items():
        rows[split] = []
        for i in picks:
            sentence, tag = ASCEND[i]
            wave = synth.speak(sentence, voice, sample_rate=16_000)
            rows[split].append({
                "id": f"{split}-{i}", "path": f"{split}/{i}.wav", "audio": {"bytes": synth.wav_bytes(wave),
                                                                               "path": f"{i}.wav"},
                "transcription": sentence, "duration": len(wave) / 16_000, "language": tag,
                "original_speaker_id": i % 2, "session_id": "s1", "topic": "persona"})
    return rows


def test_ascend_hub_copy_keeps_language_tags(tmp_path, ascend_rows):
    synth.write_hf_dataset(tmp_path / "ascend", ascend_rows, "hub")
    data = data_module("lang=zh_en", f"data.root={tmp_path / 'ascend'}", "data.num_workers=1",
                       f"data.cache_dir={tmp_path / 'cache'}")
    train = data.load("train")
    assert [u.language for u in train] == [tag for _, tag in ASCEND]
    assert train[1].duration == pytest.approx(ascend_rows["train"][1]["duration"])
    assert "|" in data.vocab.tokens and "我" in data.vocab.tokens and "m" in data.vocab.tokens
    assert [u.id for u in data.load("dev")] == ["validation-0", "validation-1", "validation-2"]


def test_ascend_csv_folder(tmp_path, ascend_rows):
    import csv
    root = tmp_path / "ascend"
    root.mkdir()
    for split, rows in ascend_rows.items():
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "audio"])
            writer.writeheader()
            for row in rows:
                (root / row["path"]).parent.mkdir(exist_ok=True)
                (root / row["path"]).write_bytes(row["audio"]["bytes"])
                writer.writerow({k: v for k, v in row.items() if k != "audio"})
    utts = corpora.read_split("ascend", str(root), "test", "zh-en", cache_dir=session_cache())
    assert [(u.id, u.language, u.speaker) for u in utts] == [("test-3", "zh", "1"), ("test-4", "en", "0"),
                                                             ("test-5", "mixed", "1")]
    assert utts[2].text == ASCEND[5][0] and audio.duration(utts[2].path) == pytest.approx(utts[2].duration)


def test_any_local_dataset_by_column_names(tmp_path):
    rows = [{"clip": {"bytes": synth.wav_bytes(np.zeros(4000)), "path": None}, "sentence": "Olá!", "who": "a"}]
    synth.write_hf_dataset(tmp_path / "mine", {"train": rows}, "save_to_disk")
    root = str(tmp_path / "mine")
    with pytest.raises(SetupError, match="needs data.columns"):
        corpora.read_split("hf_dataset", root, "train", "pt", cache_dir=tmp_path)
    with pytest.raises(SetupError, match=r"lacks the column\(s\) \['text=text'\].*'sentence'"):
        corpora.read_split("hf_dataset", root, "train", "pt", {"audio": "clip", "text": "text"}, cache_dir=tmp_path)
    with pytest.raises(SetupError, match=r"no split 'validation'; it has \['train'\]"):
        corpora.read_split("hf_dataset", root, "validation", "pt", {"audio": "clip", "text": "sentence"},
                           cache_dir=tmp_path)
    (utt,) = corpora.read_split("hf_dataset", root, "train", "pt",
                                {"audio": "clip", "text": "sentence", "speaker": "who"}, cache_dir=tmp_path)
    assert (utt.id, utt.text, utt.speaker, utt.language) == ("0", "Olá!", "a", "pt")
    assert audio.duration(utt.path) == 0.25
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetupError, match="does not load with datasets"):
        corpora.read_split("hf_dataset", str(tmp_path / "empty"), "train", "pt", {"audio": "a", "text": "b"},
                           cache_dir=tmp_path)


def test_missing_roots_and_layouts_name_the_path(tmp_path):
    assert "does not exist" in corpora.check_root("zeroth", str(tmp_path / "nope"), "ko")
    assert "clips" in corpora.check_root("common_voice", str(tmp_path), "pt")
    with pytest.raises(SetupError, match="train_data_01.*OpenSLR 40"):
        (tmp_path / "train_data_01").mkdir()
        corpora.read_split("zeroth", str(tmp_path), "train", "ko", cache_dir=tmp_path)


QUOTES = 'Ele disse "o gato" e ela disse "o pão"'


@pytest.fixture(scope="module")
def broken_cv(tmp_path_factory) -> Path:
    """Train: 6 good clips (one full of quotes), plus a corrupt MP3, a missing clip, a sentence of only
    punctuation and a 45-second clip. Dev and test: 2 good clips each."""
    root = tmp_path_factory.mktemp("broken") / "pt"
    voices = synth.TRAIN_VOICES[:2]
    good = ["O gato come o pão.", "A menina vê o barco!", "O cão leva a carta.", "A avó lava as batatas?",
            QUOTES, "O médico traz um bolo."]
    broken = ["O padeiro vende o pão.", "A criança guarda a chave.", "?!… — “”", "O vizinho pinta o barco."]

    def audio_for(i, sentence, voice):
        if i == 9:  # the 45-second clip: the sentence, then silence
            return np.concatenate([synth.speak(sentence, voice), np.zeros(48_000 * 45, dtype=np.float32)])
        return synth.speak(sentence, voice)

    splits = {"train": [(s, voices[i % 2]) for i, s in enumerate(good + broken)],
              "dev": [(s, synth.DEV_VOICES[0]) for s in good[:2]],
              "test": [(s, synth.TEST_VOICES[0]) for s in good[2:4]]}
    synth.write_common_voice(root, splits, locale="pt", audio_for=audio_for)
    clips = sorted((root / "clips").glob("*.mp3"))
    clips[6].write_bytes(b"\xff\xfb" + os.urandom(2000))  # corrupt: not MPEG frames
    clips[7].unlink()  # missing
    return root


@pytest.mark.slow  # 11-14 s of processes: make test stays under 8 minutes on 2 cores
def test_broken_rows_are_counted_and_the_good_ones_all_train(broken_cv, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", f"data.root={broken_cv}", "trainer.max_epochs=1", "trainer.max_steps=-1",
         "trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=1", "data.num_workers=1",
         "data.max_batch_seconds=20", f"hydra.run.dir={run}"],
        cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=300, env=dict(os.environ, WANDB_MODE="offline"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["kept"] == 6
    assert report["train"]["dropped"] == {"unreadable_audio": 1, "missing_file": 1, "empty_transcript": 1,
                                          "too_long": 1}
    assert report["dev"] == {**report["dev"], "kept": 2, "dropped": {}}
    assert "unreadable_audio" in result.stdout + result.stderr  # the table in the log
    # one epoch saw exactly the six good clips, the quoted sentence among them
    kept = report["train"]["seconds"]
    results = json.loads((run / "results.json").read_text())
    assert results["train_audio_seconds"] == pytest.approx(kept, abs=0.5)
    rows = corpora.read_common_voice(broken_cv, "train", "pt")
    assert QUOTES in [u.text for u in rows]  # read with quoting off: the quotes are data
    vocab = json.loads((run / "vocab.json").read_text())
    assert '"' not in vocab  # and normalisation removes them


@pytest.mark.slow  # a training run, 23 s: make test stays under 8 minutes
def test_ascend_run_reports_mer_and_each_language_tag(tmp_path, ascend_rows):
    synth.write_hf_dataset(tmp_path / "ascend", ascend_rows, "save_to_disk")
    common = [f"data.root={tmp_path / 'ascend'}", "lang=zh_en", "data.num_workers=0", "data.max_batch_seconds=20"]
    env = dict(os.environ, WANDB_MODE="offline")
    train = subprocess.run([sys.executable, "train.py", *common, "trainer.max_epochs=1",
                            "trainer.check_val_every_n_epoch=1", "trainer.val_check_interval=1.0",
                            f"hydra.run.dir={tmp_path}/run"],
                           cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=300, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    dev = subprocess.run([sys.executable, "evaluate.py", *common, f"ckpt_path={tmp_path / 'run'}", "split=validation",
                          f"hydra.run.dir={tmp_path}/eval-dev"], cwd=asr.REPO_DIR, capture_output=True, text=True,
                         timeout=300, env=env)
    assert dev.returncode == 0, dev.stderr[-3000:]
    scored = json.loads((tmp_path / "eval-dev" / "metrics.json").read_text())  # one model path: validation's figures
    evaluation = [e for e in results["evaluations"] if e["step"] == results["step"]][0]  # of the checkpoint scored
    assert {k: scored[k] for k in ("wer", "cer", "mer")} == pytest.approx(
        {k: evaluation[f"val_{k}"] for k in ("wer", "cer", "mer")}, abs=1e-6)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evaluate = subprocess.run([sys.executable, "evaluate.py", *common, f"ckpt_path={ckpt}",
                               f"hydra.run.dir={tmp_path}/eval"],
                              cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=300, env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"wer", "cer", "mer"} <= set(metrics) and metrics["n_utterances"] == 3
    assert sorted(metrics["by_language"]) == ["en", "mixed", "zh"]
    assert all(m["n_utterances"] == 1 for m in metrics["by_language"].values())
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {p["reference"] for p in predictions} == {"今天天气很好", "see you tomorrow", "我觉得 ok 没问题"}


def test_common_voice_validated_adds_training_rows_without_dev_and_test_speakers(cv_corpus, tmp_path):
    import shutil
    root = tmp_path / "pt"
    shutil.copytree(cv_corpus, root)
    header, *rows = (root / "validated.tsv").read_text(encoding="utf-8").splitlines()
    dev_speaker = (root / "dev.tsv").read_text(encoding="utf-8").splitlines()[1].split("\t")[0]
    extra = []
    for n, speaker in enumerate(["new-speaker", dev_speaker]):
        clip = f"extra_{n}.mp3"
        shutil.copy(root / "clips" / rows[0].split("\t")[1], root / "clips" / clip)
        fields = rows[0].split("\t")
        fields[:2], fields[3] = [speaker, clip], "Kiwi e yak."  # k, w, y: letters only this row has
        extra.append("\t".join(fields))
    (root / "validated.tsv").write_text("\n".join([header, *rows, *extra]) + "\n", encoding="utf-8")
    data = data_module("lang=pt", f"data.root={root}", "data.train_extra=[validated]", "data.num_workers=1")
    train = data.load("train")
    assert len(train) == 13 and train[-1].id == "extra_0.mp3"  # the dev speaker's row stays out
    assert data.report["train"]["added_from"] == {"validated": 1}
    assert {"k", "w", "y"} <= set(data.vocab.tokens)  # the vocabulary covers the added rows


def test_a_clip_that_stops_decoding_is_skipped_and_counted(cv_corpus, tmp_path):
    import shutil

    from asr.data.loading import UtteranceDataset, collate
    root = tmp_path / "pt"
    shutil.copytree(cv_corpus, root)
    data = data_module("lang=pt", f"data.root={root}", "data.num_workers=1")
    utts = data.load("dev")
    Path(utts[0].path).write_bytes(b"\xff\xfb" + bytes(100))  # corrupted after the pre-flight pass
    dataset = UtteranceDataset(utts, data.vocab)
    batch = collate([dataset[0], dataset[1]], hop=WAV2VEC2.hop)
    assert batch["skipped"] == 1 and batch["ids"] == [utts[1].id]
    assert batch["dropped"] == [(utts[0].id, "unreadable_audio")]
    assert collate([dataset[0]], hop=WAV2VEC2.hop)["ids"] == []  # a batch of nothing: the step is skipped


