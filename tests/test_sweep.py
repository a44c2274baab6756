"""A sweep at a glance: runs found under a directory, ranked by a results.json key, told apart by the
overrides they do not share (a real multirun: tests/test_tracking.py)."""

import json
import math

import pytest

from asr.tools import sweep


def _run(directory, name, overrides, **results):
    run = directory / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "results.json").write_text(json.dumps(results))


def test_runs_are_ranked_by_the_key_and_named_by_what_differs(tmp_path):
    evaluations = [{"step": 10, "val_cer": 0.9}, {"step": 20, "val_cer": 0.5}]
    _run(tmp_path, "0", ["lang=pt", "optim.lr=0.1"], val_cer=0.5, val_wer=0.9, step=20, train_seconds=10,
         train_audio_seconds=300, evaluations=evaluations)
    _run(tmp_path, "1", ["lang=pt", "optim.lr=0.01"], val_cer=0.3, val_wer=0.95, step=20, train_seconds=20,
         train_audio_seconds=300, evaluations=evaluations)
    _run(tmp_path, "2", ["lang=pt", "optim.lr=1.0"], val_cer=math.nan, step=5, pruned_at_step=5)  # diverged
    found = sweep.ranked(sweep.jobs(tmp_path), "val_cer")
    assert [j["run"] for j in found] == ["1", "0", "2"]  # NaN last
    assert sweep.varying(found) == [["optim.lr=0.01"], ["optim.lr=0.1"], ["optim.lr=1.0"]]
    assert [j["run"] for j in sweep.ranked(found, "val_wer")] == ["0", "1", "2"]
    rows = [line.split() for line in sweep.table(found).splitlines()[1:]]
    assert [(r[1], r[2], r[4], r[5], r[7]) for r in rows] == [("1", "optim.lr=0.01", "0.3000", "20", "15.0"),
                                                              ("0", "optim.lr=0.1", "0.5000", "20", "30.0"),
                                                              ("2", "optim.lr=1.0", "nan", "5(pruned)", "0.0")]


def test_a_directory_without_runs_is_named(tmp_path):
    from asr.tools.sweep import main

    with pytest.raises(SystemExit, match=f"no run \\(results.json\\) under dir={tmp_path}"):
        main([f"dir={tmp_path}"])


def test_runs_of_several_corpora_show_and_rank_by_each_corpus_s_cer(tmp_path):
    """results.json's `corpora` (each corpus's dev figures at the best evaluation): a column each, and
    key=val/<name>/cer ranks by one corpus."""
    _run(tmp_path, "0", ["data.temperature=1"], val_cer=0.30, val_wer=0.9, step=20,
         corpora={"pt": {"val_wer": 0.8, "val_cer": 0.20}, "es": {"val_wer": 0.9, "val_cer": 0.40}})
    _run(tmp_path, "1", ["data.temperature=5"], val_cer=0.35, val_wer=0.9, step=20,
         corpora={"pt": {"val_wer": 0.9, "val_cer": 0.40}, "es": {"val_wer": 0.8, "val_cer": 0.30}})
    found = sweep.ranked(sweep.jobs(tmp_path), "val/es/cer")
    assert [j["run"] for j in found] == ["1", "0"]
    assert [j["run"] for j in sweep.ranked(found, "val/pt/cer")] == ["0", "1"]
    header, *rows = [line.split() for line in sweep.table(found).splitlines()]
    assert header[7:11] == ["pt", "CER", "es", "CER"] and [r[5:7] for r in rows] == [["0.4000", "0.3000"],
                                                                                   ["0.2000", "0.4000"]]
