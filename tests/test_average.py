"""Checkpoint averaging: the mean of the weights, which checkpoints best= and last= pick, the average through
transcribe.py and asr.model.export, what is refused; callbacks.average at the end of a run."""

import pytest
import torch

import transcribe
from asr import SetupError
from asr.core import checkpoints
from asr.core.config import compose
from asr.model import inference
from asr.run import provenance, rundir
from asr.run.report import RunReport
from asr.run.training import conclude
from asr.tools import average as average_tool
from asr.tools import export as export_tool
from tests.conftest import assembled, compose_config, in_process


def checkpoint_at(source, path, step: int, cer: float | None = None, change=None) -> dict:
    """A copy of the checkpoint `source` saved as `path` at update `step`, its run report holding a dev evaluation
    of CER `cer` at that update (none with None), its weights first passed through `change(state_dict)`."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["global_step"] = step
    rows = [] if cer is None else [{"step": step, "val_cer": cer, "val_wer": 2 * cer}]
    checkpoint["callbacks"][RunReport.__qualname__]["rows"] = rows
    if change is not None:
        change(checkpoint["state_dict"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return checkpoint


def shifted(by: float, seed: int):
    """A change of weights: each floating tensor plus `by` times Gaussian noise of its shape."""
    def change(state: dict) -> None:
        generator = torch.Generator().manual_seed(seed)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                state[key] = tensor + by * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
    return change


def one_line_error(result) -> str:
    assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    return result.stderr.strip()


def test_the_average_is_the_element_wise_mean_in_float64_and_integers_are_the_newest(barely_trained, tmp_path):
    """Three checkpoints, not two: the float32 mean of two values rounds as the float64 mean cast back does, the
    mean of three does not, so the float64 sum is what this checks."""
    source = barely_trained / "checkpoints" / "last.ckpt"

    def with_counter(value: int, seed: int):  # an integer buffer (BatchNorm's num_batches_tracked, say) beside them
        def change(state: dict) -> None:
            shifted(0.1, seed)(state)
            state["model.counter"] = torch.tensor([value])
        return change

    paths = [tmp_path / f"{name}.ckpt" for name in "abc"]
    states = [checkpoint_at(source, path, step, change=with_counter(step, seed))["state_dict"]
              for path, step, seed in zip(paths, (20, 30, 10), (1, 2, 3))]
    out = tmp_path / "mean.ckpt"
    result = in_process(average_tool.main, ["ckpts=[" + ",".join(map(str, paths)) + "]", f"out={out}"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["averaged 3 checkpoints:", "  a.ckpt  update 20  dev CER -",
                                          "  b.ckpt  update 30  dev CER -", "  c.ckpt  update 10  dev CER -",
                                          f"-> {out}"]
    mean = torch.load(out, map_location="cpu", weights_only=True)
    assert set(mean["state_dict"]) == set(states[0])
    for key, tensor in mean["state_dict"].items():
        if key == "model.counter":
            assert tensor.tolist() == [30]  # b's: the newest
        else:
            assert tensor.dtype == states[0][key].dtype
            expected = sum(s[key].double() for s in states) / 3
            assert torch.equal(tensor, expected.float()), key
    assert not torch.equal(mean["state_dict"]["model.lm_head.weight"], states[0]["model.lm_head.weight"])
    assert [(r["path"], r["step"]) for r in mean["averaged"]] == [(str(p), s) for p, s in zip(paths, (20, 30, 10))]
    assert mean["global_step"] == 30 and set(checkpoints.KEYS) <= set(mean)
    assert not {"optimizer_states", "lr_schedulers", "loops", "callbacks"} & set(mean)  # not a state to resume


def test_best_picks_the_lowest_dev_cer_and_last_the_latest_updates(barely_trained, tmp_path):
    """Each checkpoint's weights are its update plus the source's, so the mean says which were averaged,
    whatever the record says."""
    source, run = barely_trained / "checkpoints" / "last.ckpt", tmp_path / "run"

    def plus(step: int):
        def change(state: dict) -> None:
            for key, tensor in state.items():
                state[key] = tensor + step
        return change

    weights = {}
    for step, cer in [(10, 0.5), (20, 0.2), (30, 0.4), (40, 0.3)]:
        weights[step] = checkpoint_at(source, run / "checkpoints" / f"best-step{step}.ckpt", step, cer, plus(step))
    # after its last evaluation
    weights[45] = checkpoint_at(source, run / "checkpoints" / "last.ckpt", 45, None, plus(45))
    key = "model.lm_head.weight"

    result = in_process(average_tool.main, [f"run={run}", "best=2"])
    assert result.returncode == 0, result.stderr
    out = run / "checkpoints" / "average-best2.ckpt"
    assert result.stdout.splitlines() == ["averaged 2 checkpoints:", "  best-step20.ckpt  update 20  dev CER 0.2000",
                                          "  best-step40.ckpt  update 40  dev CER 0.3000", f"-> {out}"]
    mean = torch.load(out, map_location="cpu", weights_only=True)
    expected = ((weights[20]["state_dict"][key].double() + weights[40]["state_dict"][key].double()) / 2).float()
    assert torch.equal(mean["state_dict"][key], expected)
    assert [(r["step"], r["val_cer"]) for r in mean["averaged"]] == [(20, 0.2), (40, 0.3)]

    result = in_process(average_tool.main, [f"run={run}", "last=2", f"out={tmp_path / 'last2.ckpt'}"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:3] == ["  last.ckpt  update 45  dev CER -",
                                               "  best-step40.ckpt  update 40  dev CER 0.3000"]
    mean = torch.load(tmp_path / "last2.ckpt", map_location="cpu", weights_only=True)
    expected = ((weights[45]["state_dict"][key].double() + weights[40]["state_dict"][key].double()) / 2).float()
    assert torch.equal(mean["state_dict"][key], expected)

    error = one_line_error(in_process(average_tool.main, [f"run={run}", "best=5"]))
    assert error.startswith(f"error: best=5: {run / 'checkpoints'} holds 4 checkpoints to pick from (best-step10.ckpt, "
                            "best-step20.ckpt, best-step30.ckpt, best-step40.ckpt)") and "save_top_k >= 5" in error


def test_an_average_loads_transcribes_and_exports_as_the_weights_it_averages_to(barely_trained, cv_corpus, tmp_path):
    """Twice the weights and none: their mean is the checkpoint's own weights, exactly, so its transcripts are
    the checkpoint's."""
    source = barely_trained / "checkpoints" / "last.ckpt"

    def scaled(factor: float):
        def change(state: dict) -> None:
            for key, tensor in state.items():
                state[key] = tensor * factor
        return change

    twice, none = tmp_path / "twice.ckpt", tmp_path / "none.ckpt"
    checkpoint_at(source, twice, 1, change=scaled(2.0))
    checkpoint_at(source, none, 2, change=scaled(0.0))
    out = tmp_path / "mean.ckpt"
    assert in_process(average_tool.main, [f"ckpts=[{twice},{none}]", f"out={out}"]).returncode == 0
    model, original = inference.from_checkpoint(out), inference.from_checkpoint(source)
    for key, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    clips = sorted(cv_corpus.glob("clips/*.mp3"))[:4]  # the corpus barely_trained trained on
    audio = "audio=[" + ",".join(f"'{c}'" for c in clips) + "]"
    ours = in_process(transcribe.main, [f"model_path={out}", audio])
    theirs = in_process(transcribe.main, [f"model_path={source}", audio])
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout and len(ours.stdout) > 20  # not a blank model
    exported = in_process(export_tool.main, [f"ckpt_path={out}", f"out={tmp_path / 'exported'}"])
    assert exported.returncode == 0 and (tmp_path / "exported" / "model.safetensors").is_file(), exported.stderr
    # outside its run (no config.yaml beside it), the average is scored on the data it records, not the demo's
    cfg = compose("evaluate", [f"ckpt_path={out}", f"run_dir={tmp_path / 'eval'}"])
    assert cfg.data.root != str(cv_corpus)
    scored, _ = provenance.the_runs_data(cfg, {}, str(out))
    assert (scored.data.root, scored.data.lang) == (str(cv_corpus), "demo")
    with pytest.raises(SetupError, match=r"is an average of checkpoints \(python -m asr.tools.average\)"
                                         r".*not a state to resume"):
        checkpoints.resume_checkpoint(str(out), tmp_path)


def test_an_out_this_tool_did_not_write_is_refused_and_its_own_average_replaced(barely_trained, tmp_path):
    source = barely_trained / "checkpoints" / "last.ckpt"
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    checkpoint_at(source, a, 1)
    checkpoint_at(source, b, 2)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    error = one_line_error(in_process(average_tool.main, [f"ckpts=[{a},{b}]", f"out={notes}"]))
    assert error == (f"error: out={notes} exists and is not an average of checkpoints that python -m "
                     f"asr.tools.average wrote: give another out=, or overwrite=true to replace it")
    assert notes.read_text() == "my notes"
    error = one_line_error(in_process(average_tool.main, [f"ckpts=[{a},{b}]", f"out={tmp_path}"]))
    assert error.startswith(f"error: out={tmp_path} is a directory")
    mean = tmp_path / "mean.ckpt"
    assert in_process(average_tool.main, [f"ckpts=[{a},{b}]", f"out={mean}"]).returncode == 0
    assert in_process(average_tool.main, [f"ckpts=[{a},{b}]", f"out={mean}"]).returncode == 0  # its own: replaced
    assert in_process(average_tool.main, [f"ckpts=[{a},{b}]", f"out={notes}", "overwrite=true"]).returncode == 0


def test_other_vocabularies_architectures_and_files_are_refused_in_one_line(barely_trained, tmp_path):
    source = barely_trained / "checkpoints" / "last.ckpt"
    a = tmp_path / "a.ckpt"
    checkpoint_at(source, a, 1)

    vocab = tmp_path / "vocab.ckpt"  # the same size, one character another: only the vocabulary tells
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    tokens = checkpoint["hyper_parameters"]["vocab"]
    tokens[tokens.index("z")] = "ʒ"
    torch.save({**checkpoint, "global_step": 2}, vocab)
    error = one_line_error(in_process(average_tool.main, [f"ckpts=[{a},{vocab}]", f"out={tmp_path / 'x.ckpt'}"]))
    assert error == (f"error: {vocab} and {a} have different vocabularies ({len(tokens)} vs {len(tokens)} tokens; "
                     f"only in vocab.ckpt: ʒ; only in a.ckpt: z): their weights do not average")

    layers = tmp_path / "layers.ckpt"  # a layer fewer
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["wav2vec2_config"]["num_hidden_layers"] -= 1
    last = checkpoint["wav2vec2_config"]["num_hidden_layers"]
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if f".layers.{last}." not in k}
    torch.save(checkpoint, layers)
    error = one_line_error(in_process(average_tool.main, [f"ckpts=[{a},{layers}]", f"out={tmp_path / 'x.ckpt'}"]))
    assert error == (f"error: {a} and {layers} are different architectures (wav2vec2_config: num_hidden_layers "
                     f"{last + 1} vs {last}): their weights do not average")

    dropout = tmp_path / "dropout.ckpt"  # training-only settings (model.config) may differ: they average
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["wav2vec2_config"]["layerdrop"] = checkpoint["hyper_parameters"]["config"]["layerdrop"] = 0.1
    torch.save(checkpoint, dropout)
    assert in_process(average_tool.main, [f"ckpts=[{a},{dropout}]", f"out={tmp_path / 'x.ckpt'}"]).returncode == 0

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    error = one_line_error(in_process(average_tool.main, [f"ckpts=[{a},{text}]", f"out={tmp_path / 'y.ckpt'}"]))
    assert error.startswith(f"error: {text} is not a readable checkpoint")
    assert not (tmp_path / "y.ckpt").exists()
    error = one_line_error(in_process(average_tool.main, [f"run={tmp_path}", "best=2", "last=2"]))
    assert error.startswith("error: give one of best=N or last=N") and error.endswith("not best and last")
    error = one_line_error(in_process(average_tool.main, [f"ckpts=[{a}]", f"out={tmp_path / 'last.ckpt'}"]))
    assert "train.py writes and reads that name" in error


def test_callbacks_average_averages_the_best_at_the_end_and_scores_both_on_dev(cv_corpus, tmp_path):
    """A real fit of 3 updates, evaluated after each: the 2 best kept (save_top_k follows average.best), averaged,
    and scored on the whole dev split the way validation scored them."""
    common = (f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=20", "logger=none",
              "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false")
    with pytest.raises(SetupError, match=r"callbacks.average.best=3 averages the 3 best checkpoints, but "
                                         r"callbacks.checkpoint.save_top_k=2 keeps 2: "
                                         r"add callbacks.checkpoint.save_top_k=3"):
        assembled(*common, f"run_dir={tmp_path / 'refused'}", "callbacks.average.best=3",
                  "callbacks.checkpoint.save_top_k=2")
    assert compose_config(overrides=["callbacks.average.best=4"]).callbacks.checkpoint.save_top_k == 4
    assert compose_config().callbacks.checkpoint.save_top_k == 1

    # near-random weights that move a little: the three dev CERs differ (the tiny model's own rates reach the
    # blank plateau, CER 1.0 at every evaluation, where any two are "the best")
    run = assembled(*common, f"run_dir={tmp_path}", "callbacks.average.best=2", "trainer.max_steps=3",
                    "trainer.val_check_interval=1", "optim.lr=1e-5", "optim.head_lr=1e-5")
    try:
        run.fit()
        results = conclude(run)
    finally:
        rundir.release()
    ranked = sorted(results["evaluations"], key=lambda r: r["val_cer"])
    assert len({r["val_cer"] for r in results["evaluations"]}) == 3
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("best-step*.ckpt"))
    assert kept == sorted(f"best-step{r['step']}.ckpt" for r in ranked[:2])
    mean = results["average"]
    assert [c["step"] for c in mean["checkpoints"]] == [r["step"] for r in ranked[:2]]
    assert mean["checkpoint"] == str(tmp_path / "checkpoints" / "average-best2.ckpt")
    assert mean["best_single_checkpoint"] == results["best_checkpoint"]
    # the best checkpoint scored here as validation scored it: the same dev clips, decoding and count
    assert mean["best_single_val_cer"] == pytest.approx(results["val_cer"], abs=1e-6)
    assert mean["best_single_val_wer"] == pytest.approx(results["val_wer"], abs=1e-6)
    assert inference.from_checkpoint(mean["checkpoint"]).vocab.tokens == run.model.vocab.tokens
