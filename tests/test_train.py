"""End to end through the real command lines: train on a generated Common Voice corpus, export,
evaluate; and a model that learns."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest
import torch
from omegaconf import OmegaConf
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

import asr
from asr.core import audio
from asr.core.frames import WAV2VEC2
from asr.core.text import Vocabulary
from asr.data import loading
from asr.model import inference, schedules
from tests.conftest import assembled
from tests.wandb_records import read_run, records


def run(script, *overrides, env=None):
    result = subprocess.run([sys.executable, script, *overrides], cwd=asr.REPO_DIR, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # end to end, 29 s: make test stays under 8 minutes
def test_train_export_evaluate(cv_corpus, tmp_path):
    run_dir = tmp_path / "train"
    run("train.py", f"data.root={cv_corpus}", "trainer.max_steps=6", "trainer.val_check_interval=3",
        "data.max_batch_seconds=20", "data.num_workers=1", "logger=wandb", "logger.group=g1",
        f"hydra.run.dir={run_dir}", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})

    for name in ("config.yaml", "vocab.json", "data_report.json", "checkpoints/last.ckpt", "results.md",
                 "model/config.json", "model/model.safetensors", "model/vocab.json",
                 "model/preprocessor_config.json", "model/processor_config.json", "model/tokenizer_config.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"

    results = json.loads((run_dir / "results.json").read_text())
    for key in ("val_loss", "val_wer", "val_cer", "step", "train_audio_seconds", "train_seconds", "padding_fraction"):
        assert key in results, key
    assert len(results["evaluations"]) == 2 and results["evaluations"][-1]["step"] == 6
    assert 0 <= results["padding_fraction"] < 0.5 and results["train_audio_seconds"] > 0
    assert 0 <= results["truncated_seconds"] < 0.01 * results["train_audio_seconds"]  # MP3 codec padding only
    card = (run_dir / "model" / "README.md").read_text()  # a model card in the seeds' format
    assert "- learning_rate: 0.003\n" in card and "- train_batch_seconds: 20" in card
    assert "| Training Loss | Epoch | Step | Validation Loss | Wer    | Cer    |" in card
    assert f"- Cer: {results['val_cer']:.4f}" in card and card.count("\n| ") == 3  # header and 2 rows
    table = (run_dir / "results.md").read_text().splitlines()
    assert table[0] == "| Training Loss | Epoch | Step | Validation Loss | Wer    | Cer    |"
    assert len(table) == 4
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["train"]["kept"] == 12 and report["dev"]["kept"] == 4

    # The exported HF directory loads with plain transformers and gives the checkpoint's logits.
    best = inference.from_checkpoint(results["best_checkpoint"]).eval()
    hf_model = Wav2Vec2ForCTC.from_pretrained(run_dir / "model").eval()
    assert type(hf_model) is Wav2Vec2ForCTC  # HF's own class, named so in config.json (AutoModelForCTC loads it)
    assert json.loads((run_dir / "model" / "config.json").read_text())["architectures"] == ["Wav2Vec2ForCTC"]
    processor = Wav2Vec2Processor.from_pretrained(run_dir / "model")
    assert processor.tokenizer.get_vocab() == best.vocab.ids
    wave = audio.load(next((cv_corpus / "clips").glob("*.mp3")))
    inputs = processor(wave, sampling_rate=16000, return_tensors="pt")
    batch = loading.collate([{"id": "x", "audio": audio.normalize(wave), "text": "", "labels": []}], hop=WAV2VEC2.hop)
    with torch.no_grad():
        ours = best(batch).logits
        theirs = hf_model(inputs.input_values, attention_mask=inputs.attention_mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # Checkpoints hold plain containers: they load with weights_only=True.
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["vocab"] == best.vocab.tokens

    eval_dir = tmp_path / "eval"
    run("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"data.root={cv_corpus}",
        "split=test", f"hydra.run.dir={eval_dir}")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n_utterances"] == len(predictions) == 4
    assert {p["id"] for p in predictions} == {
        line.split("\t")[1] for line in (cv_corpus / "test.tsv").read_text().splitlines()[1:]}
    assert all(p["reference"] == p["reference"].lower() and "." not in p["reference"] for p in predictions)
    refs, hyps = [p["reference"] for p in predictions], [p["hypothesis"] for p in predictions]
    assert (metrics["wer"], metrics["cer"]) == (pytest.approx(jiwer.wer(refs, hyps)),
                                                pytest.approx(jiwer.cer(refs, hyps)))
    assert metrics["audio_seconds"] == pytest.approx(metrics["data_report"]["seconds"], rel=0.02)  # decoded vs stated

    # logger=wandb: an eval run in the training run's group, beam and greedy side by side, the worst clips.
    wandb_dir = tmp_path / "eval-wandb"
    run("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"data.root={cv_corpus}", "split=test",
        "decoder=beam", "beam_width=8", "logger=wandb", "worst_utterances=3", f"hydra.run.dir={wandb_dir}",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    metrics = json.loads((wandb_dir / "metrics.json").read_text())
    [offline] = (wandb_dir / "wandb").glob("offline-run-*")
    eval_run = read_run(offline)
    assert eval_run["group"] == "g1" and eval_run["job_type"] == "eval" and eval_run["exit_code"] == 0
    assert eval_run["summary"]["test/cer"] == pytest.approx(metrics["cer"])
    assert eval_run["summary"]["test/greedy/cer"] == pytest.approx(metrics["greedy"]["cer"])
    tables = {a.name: {c.path: c.local_path for c in a.manifest.contents} for a in
              (r.artifact for r in records(next(offline.glob("run-*.wandb")))
               if r.WhichOneof("record_type") == "artifact")
              if a.type == "run_table"}
    [worst] = [json.loads(Path(local).read_text()) for name, files in tables.items() if "testworst" in name
               for path, local in files.items() if path.endswith(".table.json")]
    cers = [row[-1] for row in worst["data"]]
    assert len(cers) == 3 and cers == sorted(cers, reverse=True)
    assert cers[0] == pytest.approx(max(jiwer.cer(p["reference"], p["hypothesis"]) for p in
                                        map(json.loads, (wandb_dir / "predictions.jsonl").read_text().splitlines())))
    assert worst["columns"][2] == "audio" and all(row[2]["_type"] == "audio-file" for row in worst["data"])


def test_default_logger_writes_csv_with_learning_rate(cv_corpus, tmp_path):
    run("train.py", f"data.root={cv_corpus}", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1", "data.max_batch_seconds=20", "data.num_workers=0", f"hydra.run.dir={tmp_path}")
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    column = lambda name: [float(r[name]) for r in rows if r.get(name)]  # noqa: E731
    lr = column(next(h for h in rows[0] if h.startswith("lr-AdamW")))
    cfg = OmegaConf.load(tmp_path / "config.yaml")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    schedule = schedules.build(optimizer, 2, **cfg.sched)
    expected = []
    for _ in range(2):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lr == pytest.approx(expected)  # one per update, the run's schedule
    losses = column("train/loss")
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    evaluation = json.loads((tmp_path / "results.json").read_text())["evaluations"][-1]
    assert column("val/cer") == [pytest.approx(evaluation["val_cer"])]
    assert (all(0 <= x < 1 for x in column("train/padding_fraction"))
            and all(x > 0 for x in column("train/audio_seconds_per_second")))


def test_tiny_model_learns_a_batch(cv_corpus):
    """Gradients reach the whole model: 60 updates on one batch cut its CTC loss by more than half."""
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "model.config.mask_time_prob=0", "logger=none")
    model, dm = run.model, run.data
    batch = loading.collate([loading.UtteranceDataset(dm.load("train"), dm.vocab)[i] for i in range(4)],
                            hop=WAV2VEC2.hop)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (model.model.lm_head.out_features == len(dm.vocab)
            == len(Vocabulary.from_transcripts(dm.load("train").column("text"))))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Real DDP through train.py: 2 CPU processes (gloo), 4 updates, the first 2 of the CTC head only.
    Each rank records its batches and what each update changed (tests.callbacks.RecordUpdates)."""
    run_dir = tmp_path_factory.mktemp("ddp")
    run("train.py", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "data.num_workers=0", "logger=none", "model.freeze_finetune_updates=2",
        "+callbacks.record._target_=tests.callbacks.RecordUpdates", f"+callbacks.record.out_dir={run_dir}/record",
        f"hydra.run.dir={run_dir}")
    return run_dir, [json.loads((run_dir / "record" / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_ddp_ranks_train_on_disjoint_batches_and_the_report_sums_them(ddp_run):
    run_dir, ranks = ddp_run
    results = json.loads((run_dir / "results.json").read_text())
    assert [row["step"] for row in results["evaluations"]] == [2, 4]
    assert [len(r["ids"]) for r in ranks] == [4, 4]
    clips = [[c for batch in r["ids"] for c in batch] for r in ranks]
    assert not set(clips[0]) & set(clips[1])  # no clip on both ranks
    assert results["train_audio_seconds"] == pytest.approx(sum(sum(r["seconds"]) for r in ranks))
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_freeze_finetune_updates_under_ddp(ddp_run):
    """The first 2 updates change the CTC head only, on both ranks; then the encoder learns too."""
    _, ranks = ddp_run
    head = ["model.lm_head.bias", "model.lm_head.weight"]
    for rank in ranks:
        assert rank["changed"][:2] == [head, head]
        for changed in rank["changed"][2:]:
            assert set(head) < set(changed) and "model.wav2vec2.encoder.layers.0.attention.q_proj.weight" in changed


@pytest.mark.slow
def test_tiny_model_learns_a_corpus_it_was_not_tuned_on(learned_run):
    """`model=tiny` with its defaults (learning rate, batch budget, schedule over its update budget) on a
    generated corpus unlike the demo (short sentences of other words and voices) leaves the CTC blank
    plateau: dev CER under 0.5 within 500 updates (validated every 50; it stops once there)."""
    results = json.loads((learned_run.dir / "results.json").read_text())
    assert results["val_cer"] < 0.5 and results["step"] <= 500, results["evaluations"]
