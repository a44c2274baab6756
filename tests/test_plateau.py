"""The CTC blank plateau: the dev shares of empty transcripts and blank frames (asr.model.module), in the logs and
results.json (asr.run.report); the run says once that it is on the plateau and, past warn_after, what to check,
each check with its value (asr.run.plateau)."""

import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from asr.run import plateau
from asr.tools import synth
from tests.conftest import SHRUNK, assembled


@pytest.fixture(scope="module")
def run(cv_corpus, tmp_path_factory):
    """The tiny model and data module train.py builds on the test corpus (not fitted)."""
    return assembled(f"data.root={cv_corpus}", "data.num_workers=0", f"run_dir={tmp_path_factory.mktemp('run')}",
                     *SHRUNK, accelerator="cpu")


def _validate(model, logits: torch.Tensor, frames: list[int]) -> dict:
    """validation_step on crafted logits (B, T, V) with `frames` valid frames per clip; the two shares."""
    model.val_empty_hypotheses.reset()
    model.val_blank_frames.reset()
    batch = {"ids": [f"c{i}" for i in range(len(frames))], "lengths": [n * 320 + 80 for n in frames],
             "texts": ["a"] * len(frames), "labels": torch.zeros(len(frames), 1, dtype=torch.long),
             "label_lengths": [1] * len(frames), "audio": torch.zeros(len(frames), max(frames) * 320 + 80)}
    original = model.model.logits
    model.model.logits = lambda *args, **kwargs: (logits, torch.tensor(frames))
    try:
        assert model.model.frames(batch["lengths"]).tolist() == frames
        model.validation_step(batch, 0)
    finally:
        model.model.logits = original
    return {"empty": float(model.val_empty_hypotheses.compute()), "blank": float(model.val_blank_frames.compute())}


def test_shares_of_empty_transcripts_and_blank_frames_over_the_clips_own_frames(run):
    model, blank, a = run.model, run.model.vocab.blank_id, run.model.vocab.ids["a"]
    logits = torch.zeros(2, 10, len(model.vocab))
    logits[:, :, blank] = 1.0  # every frame blank ...
    logits[1, 2, blank], logits[1, 2, a] = 0.0, 1.0  # ... but one of the second clip's
    logits[0, 6:8, a] = 2.0  # the first clip's padding (frames 6-9: "a", "a", blank, blank) is not counted
    shares = _validate(model, logits, [6, 10])
    assert shares["empty"] == 0.5  # the first clip's transcript is empty, the second's is "a"
    assert shares["blank"] == pytest.approx(15 / 16)  # 6 + 9 blank of 16 valid frames (not 17/16, 17/20)


def test_results_and_logs_carry_both_shares(cv_corpus, tmp_path, caplog):
    """A real fit: results.json's evaluation rows and the logged metrics hold both shares; the model card's
    table keeps its columns; the run says once that it is on the plateau, with the checks past warn_after."""
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=20", f"run_dir={tmp_path}",
                    "callbacks.plateau.warn_after=0.5", "callbacks.plateau.cer=0", "logger=csv", accelerator="cpu",
                    max_steps=4, val_check_interval=2, check_val_every_n_epoch=None)
    with caplog.at_level(logging.INFO, logger="asr.run.plateau"):
        run.fit()
    results = run.report.write_results()
    rows = results["evaluations"]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert 0 <= row["val_empty_hypotheses"] <= 1 and 0 <= row["val_blank_frames"] <= 1
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/empty_hypotheses" in header and "val/blank_frames" in header
    assert (tmp_path / "results.md").read_text().splitlines()[0] == plateau_free_header()
    said = [r.getMessage() for r in caplog.records if r.name == "asr.run.plateau" and r.levelno >= logging.WARNING]
    # once, with the checks: the first evaluation (update 2) is at 50% already; nothing again at 4
    assert len(said) == 1, said
    assert "update 2 (50% of the schedule): on the CTC blank plateau" in said[0] and "Check:" in said[0]
    for check in ("vocabulary:", "learning rate:", "labels longer than their frames:", "encoder:"):
        assert f"- {check}" in said[0], check
    assert "parameters trainable, gradient norm " in said[0]  # the encoder learns: it had gradients


def plateau_free_header() -> str:
    from asr.run.report import HEADER

    return HEADER.splitlines()[0]


def _trainer(run, step: int, cer: float, total: int = 100, **extra) -> SimpleNamespace:
    metrics = {"val/cer": torch.tensor(cer), "val/empty_hypotheses": torch.tensor(1.0),
               "val/blank_frames": torch.tensor(0.99)}
    return SimpleNamespace(callback_metrics=metrics, sanity_checking=False, global_step=step,
                           estimated_stepping_batches=total, callbacks=[], is_global_zero=True,
                           optimizers=[], datamodule=run.data, **extra)


def _said(caplog, watch, run, *trainers) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asr.run.plateau"):
        for trainer in trainers:
            run.model._trainer = trainer
            try:
                watch.on_validation_end(trainer, run.model)
            finally:
                run.model._trainer = None
    return [r.getMessage() for r in caplog.records if r.name == "asr.run.plateau"]


@pytest.mark.parametrize("hold,pretrained,held", [("auto", None, True), ("auto", "facebook/wav2vec2-xls-r-300m", False),
                                                  (True, "facebook/wav2vec2-xls-r-300m", True), (False, None, False)])
def test_spec_augment_starts_once_off_the_plateau(run, caplog, hold, pretrained, held):
    """hold_spec_augment: no time masks while on the plateau (auto: for a model trained from scratch), the
    configured ones from the first evaluation below `cer`, and at the end of training whatever happened."""
    model, configured = run.model, run.model.model.config.mask_time_prob
    assert configured > 0
    watch = plateau.PlateauWatch(cer=0.9, warn_after=None, hold_spec_augment=hold)
    model.hparams.pretrained = pretrained
    try:
        watch.on_train_start(_trainer(run, 0, 1.0), model)
        assert model.model.config.mask_time_prob == (0.0 if held else configured)
        _said(caplog, watch, run, _trainer(run, 50, 1.0))
        assert model.model.config.mask_time_prob == (0.0 if held else configured)
        _said(caplog, watch, run, _trainer(run, 100, 0.8))
        assert model.model.config.mask_time_prob == configured
        watch.on_train_start(_trainer(run, 100, 0.8), model)  # resumed off the plateau: masks from the start
        assert model.model.config.mask_time_prob == configured
        held_to_the_end = plateau.PlateauWatch(cer=0.9, warn_after=None, hold_spec_augment=True)
        held_to_the_end.on_train_start(_trainer(run, 0, 1.0), model)
        held_to_the_end.on_train_end(_trainer(run, 10, 1.0), model)
        assert model.model.config.mask_time_prob == configured
    finally:
        model.hparams.pretrained = None
        model.model.config.mask_time_prob = configured


def test_says_once_then_warns_once_past_its_share_of_the_schedule(run, caplog):
    watch = plateau.PlateauWatch(cer=0.9, warn_after=0.3, hold_spec_augment=False)
    said = _said(caplog, watch, run, *(_trainer(run, step, 1.0) for step in (10, 20, 30, 40)))
    assert len(said) == 2
    assert said[0].startswith("update 10 (10% of the schedule): on the CTC blank plateau (dev CER 1.000, "
                              "100% of transcripts empty, 99.0% of frames blank)")
    assert plateau.TYPICAL in said[0] and plateau.TINY_TYPICAL in said[0] and "past 30% of the schedule" in said[0]
    assert said[1].startswith("update 30 (30% of the schedule): still on the CTC blank plateau")
    assert _said(caplog, watch, run, _trainer(run, 50, 1.0)) == []  # said; a restored run remembers it
    restored = plateau.PlateauWatch(cer=0.9, warn_after=0.3, hold_spec_augment=False)
    restored.load_state_dict(watch.state_dict())
    assert _said(caplog, restored, run, _trainer(run, 60, 1.0)) == []


def test_a_first_evaluation_past_its_share_warns_once_with_the_checks(run, caplog):
    """A short run (60 updates, dev at 50, warn_after 0.5): one warning at update 50, the checks, not the
    "normal early" line beside it."""
    watch = plateau.PlateauWatch(cer=0.9, warn_after=0.5, hold_spec_augment=False)
    said = _said(caplog, watch, run, _trainer(run, 50, 1.0, total=60), _trainer(run, 60, 1.0, total=60))
    assert len(said) == 1 and said[0].startswith("update 50 (83% of the schedule): on the CTC blank plateau")
    assert "Check:\n- " in said[0]


def test_off_the_plateau_it_says_nothing_more(run, caplog):
    watch = plateau.PlateauWatch(cer=0.9, warn_after=0.3, hold_spec_augment=False)
    said = _said(caplog, watch, run, _trainer(run, 10, 1.0), _trainer(run, 20, 0.85), _trainer(run, 40, 1.0))
    assert len(said) == 2 and said[1] == "update 20 (20% of the schedule): off the CTC blank plateau (dev CER 0.850)"
    assert watch.left_at == 20
    assert _said(caplog, plateau.PlateauWatch(cer=0.9, warn_after=0.3, hold_spec_augment=False), run,
                 _trainer(run, 40, 0.5)) == []
    assert len(_said(caplog, plateau.PlateauWatch(cer=0.9, warn_after=None, hold_spec_augment=False), run,
                     *(_trainer(run, s, 1.0) for s in (10, 50, 90)))) == 1  # warn_after null: never the checks


def test_a_wall_clock_budget_counts_as_the_schedule(run):
    """Under trainer.max_time the share is the larger of updates and time spent: a run cut by the clock is
    warned about before its (longer) schedule would say so."""
    timer = Timer(duration="00:00:03:20")  # what Lightning adds for trainer.max_time
    timer.time_elapsed, timer.time_remaining = lambda stage: 60.0, lambda stage: 140.0
    assert plateau.PlateauWatch.share(_trainer(run, 10, 1.0)) == pytest.approx(0.1)
    trainer = _trainer(run, 10, 1.0)
    trainer.callbacks = [timer]
    assert plateau.PlateauWatch.share(trainer) == pytest.approx(0.3)


def test_vocabulary_check_names_characters_no_transcript_holds(run):
    vocab = run.model.vocab
    said = plateau.vocabulary_check(run.data, vocab)
    assert said.startswith(f"vocabulary: {len(vocab)} tokens; in no training transcript: none; "
                           "dev characters outside it: 0")
    foreign = type(vocab)(vocab.tokens[:-2] + ["ж", "ы", "[UNK]", "[PAD]"])  # another language's vocabulary
    assert (f"vocabulary: {len(vocab) + 2} tokens; in no training transcript: ж ы;"
            in plateau.vocabulary_check(run.data, foreign))


def test_learning_rate_check_gives_the_rate_now_and_the_peak(run):
    optimizer = SimpleNamespace(param_groups=[{"lr": 1.5e-3}, {"lr": 1.5e-3}, {"lr": 6e-3}, {"lr": 6e-3}])
    trainer = _trainer(run, 10, 1.0, total=900)
    trainer.optimizers = [optimizer]
    head_lr, run.model.hparams.optim["head_lr"] = run.model.hparams.optim["head_lr"], 1.2e-2
    try:
        said = plateau.learning_rate_check(trainer, run.model)
    finally:
        run.model.hparams.optim["head_lr"] = head_lr
    assert said.startswith("learning rate: 1.50e-03 now (peak optim.lr 3.00e-03), CTC head 6.00e-03 "
                           "(optim.head_lr 0.012), schedule linear over 900 updates"), said


def test_feasibility_check_counts_labels_longer_than_their_frames(tmp_path):
    """Clips of 0.1 s (4 frames) with a sentence: dropped from train and counted, and counted in dev."""
    root = tmp_path / "pt"
    sentences = synth.demo_sentences(8, random.Random(3))
    voice = synth.TRAIN_VOICES[0]
    splits = {"train": [(s, voice) for s in sentences[:6]], "dev": [(s, voice) for s in sentences[6:]],
              "test": [(sentences[0], voice)]}
    short = {0, 1, 6}  # two training clips and one dev clip too short for their labels

    def audio_for(i, sentence, _voice):
        seconds = 0.1 if i in short else 0.1 + 0.08 * len(sentence)  # 0.08 s per character: 4 frames each
        return (0.1 * np.random.default_rng(i).standard_normal(int(48_000 * seconds))).astype(np.float32)

    synth.write_common_voice(root, splits, locale="pt", audio_for=audio_for)
    built = assembled(f"data.root={root}", "lang=pt", "data.num_workers=0", f"run_dir={tmp_path / 'run'}", *SHRUNK,
                      accelerator="cpu")
    said = plateau.feasibility_check(built.data)
    assert said == ("labels longer than their frames: 2 training clips dropped of 6 (data report: "
                    "transcript_longer_than_frames); dev clips: 1 of 2"), said


def test_encoder_check_says_whether_the_encoder_has_gradients(run):
    """The norm is taken at the end of each training batch (Lightning drops the gradients before an evaluation)."""
    model, watch = run.model, plateau.PlateauWatch(cer=0.9, warn_after=0.3, hold_spec_augment=False)
    model.zero_grad(set_to_none=True)
    watch.on_train_batch_end(None, model, None, None, 0)
    said = plateau.encoder_check(model, watch._encoder_grad_norm)
    total = sum(p.numel() for p in model.model.wav2vec2.parameters())
    assert said == f"encoder: {total:,} of {total:,} parameters trainable, no gradients in the last batch"
    model.hparams.freeze_finetune_updates = 50
    try:
        assert (said + "; model.freeze_finetune_updates=50 holds it until update 50"
                == plateau.encoder_check(model, None))
    finally:
        model.hparams.freeze_finetune_updates = 0
    for p in model.model.wav2vec2.parameters():
        p.grad = torch.full_like(p, 0.5)
    try:
        watch.on_train_batch_end(None, model, None, None, 0)
        assert plateau.encoder_check(model, watch._encoder_grad_norm).endswith(
            f"gradient norm {0.5 * total ** 0.5:.3g} in the last batch")
    finally:
        model.zero_grad(set_to_none=True)
