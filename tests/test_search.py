"""An Optuna search over Hydra overrides (asr/run/search.py), run for real on a small corpus: trials as Hydra
jobs, their objective from results.json, a study that reloads from its journal file and goes on, a trial
its sweeper left running tried again, and a trial pruned from inside its job."""

import json
import os
import subprocess
import sys

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

import asr
from asr.run import search, tracking


def test_the_search_space_reads_hydras_sweep_grammar():
    space, fixed = search.search_space(["optim.lr=tag(log, interval(1e-5, 1e-3))",
                                        "sched.warmup_ratio=interval(0, 0.3)",
                                        "trainer.max_steps=range(100, 401, 100)", "model=choice(tiny, xlsr_300m)",
                                        "data.max_batch_seconds=range(10.0, 40.0, 10.0)", "seed=int(interval(1, 9))",
                                        "trainer.devices=1"])
    assert space["optim.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["sched.warmup_ratio"] == FloatDistribution(0.0, 0.3)
    assert space["trainer.max_steps"] == IntDistribution(100, 400, step=100)  # the stop is excluded, as in a grid
    assert space["data.max_batch_seconds"] == FloatDistribution(10.0, 30.0, step=10.0)
    assert space["model"] == CategoricalDistribution(["tiny", "xlsr_300m"])
    assert space["seed"] == IntDistribution(1, 9)
    assert fixed == {"trainer.devices": "1"}
    space, fixed = search.search_space(["optim.lr=interval(1e-5, 1e-3)", "optim.lr=3e-4"])  # the command line fixes it
    assert space == {} and fixed == {"optim.lr": "0.0003"}
    [override] = OverridesParser.create().parse_overrides(["optim.lr=glob(*)"])
    with pytest.raises(asr.SetupError, match="interval"):
        search.distribution(override)


@pytest.mark.parametrize("name", ["demo_lr", "cv7_pt_300m_lr"])
def test_each_search_config_searches_keys_its_run_has(name):
    from hydra import compose, initialize_config_dir

    from tests.conftest import compose_config

    with initialize_config_dir(config_dir=str(asr.REPO_DIR / "conf"), version_base="1.3"):
        hydra = compose("train", overrides=[f"search={name}"], return_hydra_config=True).hydra
    space, fixed = search.search_space([f"{k}={v}" for k, v in hydra.sweeper.params.items()])
    assert space and not fixed and hydra.sweeper.study_name == name
    cfg = compose_config(overrides=[f"search={name}"])  # the run a trial makes: composed and checked
    assert all(OmegaConf.select(cfg, key) is not None for key in space)


def run_search(corpus, sweep_dir, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", "-m", "search=demo_lr", f"data.root={corpus}", "trainer.max_steps=4",
         "trainer.val_check_interval=2", "data.num_workers=0", f"hydra.sweep.dir={sweep_dir}", *overrides],
        cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DATA_DIR=str(sweep_dir / "wandb-data")))


def load(sweep_dir) -> optuna.Study:
    """The study as another process (a restarted sweeper, a trial on another node) finds it."""
    return optuna.load_study(study_name="demo_lr", storage=search.storage(str(sweep_dir / "optuna.journal")))


@pytest.mark.slow
def test_a_search_reloads_goes_on_retries_an_interrupted_trial_and_prunes(cv_corpus, tmp_path):
    sweep_dir = tmp_path / "search"
    result = run_search(cv_corpus, sweep_dir, "hydra.sweeper.n_trials=3", "logger=wandb")
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    from tests.wandb_records import read_run

    runs = [read_run(d) for t in study.trials
            for d in (sweep_dir / f"trial-{t.number}" / "wandb").glob("offline-run-*")]
    assert [r["name"] for r in runs] == [f"lr={t.params['optim.lr']},warmup_ratio={t.params['sched.warmup_ratio']}"
                                         for t in study.trials]  # what the search varies
    assert {r["group"] for r in runs} == {tracking.sweep_group(str(sweep_dir), str(asr.REPO_DIR))}  # <dir>/search
    assert all("search=demo_lr" in r["tags"] for r in runs)
    for trial in study.trials:  # each trial is the job in trial-<number>: its parameters, its objective
        run = sweep_dir / f"trial-{trial.number}"
        config = OmegaConf.load(run / "config.yaml")
        assert config.optim.lr == pytest.approx(trial.params["optim.lr"])
        assert config.sched.warmup_ratio == pytest.approx(trial.params["sched.warmup_ratio"])
        assert 3e-4 <= trial.params["optim.lr"] <= 1e-2
        assert trial.value == pytest.approx(json.loads((run / "results.json").read_text())["val_cer"])
        assert list(trial.intermediate_values) == [2, 4]  # each evaluation reported from inside the job
    assert len({t.params["optim.lr"] for t in study.trials}) == 3

    # A sweeper killed while its trial ran leaves the trial running in the storage.
    space = {"optim.lr": FloatDistribution(3e-4, 1e-2, log=True), "sched.warmup_ratio": FloatDistribution(0.0, 0.3)}
    study.enqueue_trial({"optim.lr": 5e-3, "sched.warmup_ratio": 0.1})
    assert study.ask(space).number == 3
    # The same command goes on: one trial more to 4, with a pruner that rejects any dev CER.
    result = run_search(cv_corpus, sweep_dir, "hydra.sweeper.n_trials=4", "~hydra.sweeper.pruner",
                        "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:-1.0}")
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL, TrialState.PRUNED]
    assert study.trials[3].user_attrs == {search.INTERRUPTED: True}
    retried = study.trials[4]
    assert retried.params == {"optim.lr": 5e-3, "sched.warmup_ratio": 0.1}  # the interrupted trial's parameters
    results = json.loads((sweep_dir / "trial-4" / "results.json").read_text())
    assert results["pruned_at_step"] == 2 and len(results["evaluations"]) == 1  # it stopped at its first evaluation
    assert list(retried.intermediate_values) == [2]

    summary = subprocess.run([sys.executable, "-m", "asr.tools.sweep", f"dir={sweep_dir}"], cwd=asr.REPO_DIR,
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    rows = [line.split() for line in summary.stdout.splitlines()[1:5]]
    assert sorted(row[1] for row in rows) == ["trial-0", "trial-1", "trial-2", "trial-4"]
    assert [row for row in rows if row[1] == "trial-4"][0][-3] == "2(pruned)"  # the step column


@pytest.mark.slow
def test_a_search_of_ddp_trials_keeps_its_ranks_in_step_and_prunes_them_together(cv_corpus, tmp_path):
    """Lightning starts rank 1 by re-running the command line, so rank 1 runs the sweeper too: it must run
    rank 0's trials in rank 0's order, and stop a pruned trial with it (else rank 0 waits for it forever)."""
    sweep_dir = tmp_path / "search"
    result = run_search(cv_corpus, sweep_dir, "hydra.sweeper.n_trials=2", "trainer.devices=2", "trainer.strategy=ddp",
                        "trainer.accelerator=cpu", "~hydra.sweeper.pruner",
                        "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:-1.0}")
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for trial in study.trials:
        results = json.loads((sweep_dir / f"trial-{trial.number}" / "results.json").read_text())
        assert results["pruned_at_step"] == 2 and results["batch_per_update"]["world_size"] == 2


@pytest.mark.slow
def test_a_search_runs_its_trials_as_slurm_jobs(slurm, cv_corpus, tmp_path):
    """hydra/launcher=slurm: a batch of n_jobs trials is one array job; each trial reports its evaluations
    to the journal file from its SLURM job, and the sweeper tells the study what the jobs returned."""
    sweep_dir = tmp_path / "search"
    result = run_search(cv_corpus, sweep_dir, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                        "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.timeout_min=10",
                        "trainer.accelerator=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    sbatch = next((sweep_dir / ".submitit").glob(".submission_file_*.sh")).read_text()
    assert "#SBATCH --array=0-1" in sbatch  # the two trials, one array job
    study = load(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for trial in study.trials:
        results = json.loads((sweep_dir / f"trial-{trial.number}" / "results.json").read_text())
        assert trial.value == pytest.approx(results["val_cer"]) and list(trial.intermediate_values) == [2, 4]
