"""Hyper-parameter search with Optuna over Hydra overrides: a Hydra sweeper that asks Optuna for trials,
launches each as a Hydra job (any launcher: in-process, or SLURM jobs through hydra/launcher=slurm),
and tells it the job's results.json objective; a callback that reports each evaluation to the study
from inside the job, so that the pruner can stop a bad trial early.

    python train.py -m search=demo_lr                # conf/search/demo_lr.yaml: the space and the budget
    python train.py -m search=cv7_pt_300m_lr hydra/launcher=slurm data.root=...

The study lives in `hydra.sweeper.storage`: by default a journal file in the search directory (Optuna's
JournalStorage, which Optuna documents for NFS, where SQLite's fcntl locks may fail), or a database URL.
Run the same command again and the search goes on where it stopped: finished trials count towards
`n_trials`, and a trial its sweeper left running (the sweeper was killed) is marked failed and its
parameters tried again.

Why not hydra-optuna-sweeper: its newest release (1.3.0) pins optuna<3 (2.10), which has no journal
storage, and it tells Optuna only a job's final value, so nothing can be pruned.
"""

import logging
import math
import os
import time
from pathlib import Path

import lightning as L
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from asr import SetupError

log = logging.getLogger(__name__)
INTERRUPTED = "interrupted"  # user attribute of a trial whose sweeper died while it ran


def storage(where: str):
    """A database URL (sqlite:///..., postgresql://...) as Optuna takes it; any other string is the
    path of a journal file, created with its directory."""
    if "://" in where:
        return where
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(where).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(where)))


def distribution(override: Override) -> BaseDistribution | str:
    """The Optuna distribution of a sweep override, in Hydra's grammar (as hydra-optuna-sweeper reads it):
    `interval(1e-5, 1e-3)` uniform (floats; `int(interval(1, 9))` integers), `tag(log, interval(...))`
    log-uniform, `range(1, 9, 2)` stepped, `choice(a, b)` categorical; a plain value is fixed (returned
    as it is written)."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):  # range(start, stop, step): stop excluded, as Hydra's grid has it
        last = value.start + (math.ceil((value.stop - value.start) / value.step) - 1) * value.step
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, last, step=value.step)
        return IntDistribution(value.start, last, step=value.step)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SetupError(f"{override.input_line}: a search takes interval(), range() or choice() sweeps.")


def search_space(overrides: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """(the searched keys' distributions, the fixed overrides) of `hydra.sweeper.params` and the command line."""
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        value = distribution(override)
        if isinstance(value, BaseDistribution):
            space[key] = value
            fixed.pop(key, None)
        else:
            fixed[key] = value
            space.pop(key, None)  # a value on the command line fixes a searched key
    return space, fixed


def _overrides(fixed: dict[str, str], params: dict) -> list[str]:
    """A trial's job: the fixed overrides, then the trial's parameters."""
    return [f"{k}={v}" for k, v in (fixed | params).items()]


class OptunaSweeper(Sweeper):
    """Asks the study for `n_jobs` trials at a time, launches them as Hydra jobs numbered by trial (their
    run directories `<sweep dir>/trial-<number>`, conf/hydra/sweeper/optuna.yaml), and tells it each
    job's `objective` from the results it returns: pruned trials as pruned, a job that failed (an error,
    or no objective) as failed. Registered with Hydra by hydra_plugins/asr_search.py."""

    def __init__(self, study_name: str, storage: str, direction: str, objective: str, n_trials: int,
                 n_jobs: int, sampler, pruner, params: dict | None):
        self.study_name, self.storage, self.direction, self.objective = study_name, storage, direction, objective
        self.n_trials, self.n_jobs, self.sampler, self.pruner = n_trials, n_jobs, sampler, pruner
        self.params = dict(params or {})

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        if not space:
            raise SetupError("nothing to search: hydra.sweeper.params (or the command line) names no "
                             "interval(), range() or choice() sweep.")
        study = optuna.create_study(study_name=self.study_name, storage=storage(self.storage),
                                    sampler=self.sampler, pruner=self.pruner, direction=self.direction,
                                    load_if_exists=True)
        if os.environ.get("LOCAL_RANK", "0") != "0":
            return self._follow(study, fixed)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's sweeper: the search's record
        self._retry_interrupted(study)
        done = self._done(study)
        log.info("study %s in %s: %d of %d trials done, searching %s", self.study_name, self.storage, done,
                 self.n_trials, ", ".join(space))
        failed, launched = [], 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            overrides = [_overrides(fixed, t.params) for t in trials]
            for trial, job, override in zip(trials, self._launch(trials, overrides), overrides):
                state, value = self._outcome(job)
                study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
                log.info("trial %d %s%s: %s", trial.number, state.name.lower(),
                         f" ({self.objective} {value:.4f})" if value is not None else "", " ".join(override))
                if state == TrialState.FAIL:
                    failed.append(trial.number)
            done, launched = done + len(trials), launched + len(trials)
            if len(failed) == launched:  # e.g. a wrong data path fails every trial alike
                raise SetupError(f"every trial so far failed ({len(failed)}); see the log of trial {failed[0]}")
        if any(t.state == TrialState.COMPLETE for t in study.trials):
            best = study.best_trial
            log.info("best: trial %d, %s %.4f, %s", best.number, self.objective, best.value,
                     " ".join(f"{k}={v}" for k, v in best.params.items()))

    def _done(self, study: optuna.Study) -> int:
        return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished()
                   and not t.user_attrs.get(INTERRUPTED))

    def _follow(self, study: optuna.Study, fixed: dict[str, str]) -> None:
        """A rank that Lightning started for a trial's DDP (LOCAL_RANK > 0) re-runs the command line, so
        it comes here: it runs the trials that rank 0 runs, in rank 0's order (the trial rank 0 is running,
        then the next numbers as rank 0 asks them), and ends when rank 0's search does."""
        parent = os.getppid()
        number = min(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        while True:
            trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
            if trial is None:  # not asked yet; or the search is over
                if os.getppid() != parent or self._done(study) >= self.n_trials:
                    return
                time.sleep(1.0)
                continue
            self.launcher.launch([_overrides(fixed, trial.params)], initial_job_idx=number)
            number += 1

    def _launch(self, trials: list, overrides: list[list[str]]) -> list:
        """The trials' jobs, numbered by trial (`hydra.job.num`: how a job's Pruning finds its trial). In one
        launch (one array job under SLURM) when their numbers follow each other, as they do unless another
        process asks the same study at the same time."""
        first = trials[0].number
        if [t.number for t in trials] == list(range(first, first + len(trials))):
            return list(self.launcher.launch(overrides, initial_job_idx=first))
        return [self.launcher.launch([o], initial_job_idx=t.number)[0] for t, o in zip(trials, overrides)]

    def _outcome(self, job) -> tuple[TrialState, float | None]:
        try:
            results = job.return_value or {}  # raises the job's error if it failed
        except Exception as error:  # noqa: BLE001 (whatever stopped the trial; the search goes on)
            log.warning("trial failed: %s: %s", type(error).__name__, error)
            return TrialState.FAIL, None
        if results.get("pruned_at_step") is not None:
            return TrialState.PRUNED, None
        value = results.get(self.objective)
        if not isinstance(value, (int, float)) or math.isnan(value):
            log.warning("trial has no %s in its results", self.objective)
            return TrialState.FAIL, None
        return TrialState.COMPLETE, float(value)

    @staticmethod
    def _retry_interrupted(study: optuna.Study) -> None:
        """Trials still running in the storage when a sweeper starts were left by one that died: each is
        marked failed (and interrupted) and its parameters are queued to run again."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            optuna.trial.Trial(study, trial._trial_id).set_user_attr(INTERRUPTED, True)
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params)
            log.warning("trial %d was left running by an earlier sweeper: queued again", trial.number)


class Pruning(L.Callback):
    """Reports each evaluation's `objective` (e.g. val_cer, read as val/cer) to the trial this job runs,
    and stops the run when the pruner says so (results.json then holds `pruned_at_step`). Rank 0 talks to
    the storage; every rank stops alike. train.py adds it to the jobs of a search (`for_this_job`)."""

    def __init__(self, storage: str, study_name: str, trial: int | None, objective: str, pruner):
        self.where, self.study_name, self.number, self.pruner = storage, study_name, trial, pruner
        self.metric = objective.replace("_", "/", 1)
        self.trial: optuna.trial.Trial | None = None
        self.pruned_at_step: int | None = None

    def _trial(self) -> optuna.trial.Trial:
        if self.trial is None:
            study = optuna.load_study(study_name=self.study_name, storage=storage(self.where), pruner=self.pruner)
            [frozen] = [t for t in study.get_trials(deepcopy=False) if t.number == self.number]
            self.trial = optuna.trial.Trial(study, frozen._trial_id)
        return self.trial

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        prune = False
        if trainer.is_global_zero and self.number is not None:
            trial = self._trial()
            trial.report(float(trainer.callback_metrics[self.metric]), step=trainer.global_step)
            prune = trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned_at_step = trainer.global_step
            trainer.should_stop = True
            log.info("trial %d pruned at update %d (%s %.4f)", self.number, trainer.global_step, self.metric,
                     float(trainer.callback_metrics[self.metric]))


def for_this_job() -> Pruning | None:
    """The Pruning callback of this job if it is a trial of a search (its sweeper is OptunaSweeper), built
    from the sweeper's config: storage, study, objective, pruner; the job number is the trial number.
    Ranks that Lightning starts for the job (in run mode, LOCAL_RANK set) get one too, without a trial:
    they take rank 0's decision."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    if not HydraConfig.initialized() or not str(HydraConfig.get().sweeper.get("_target_")).endswith("OptunaSweeper"):
        return None
    hydra = HydraConfig.get()
    multirun = str(hydra.mode) == "RunMode.MULTIRUN"
    if not multirun and "LOCAL_RANK" not in os.environ:
        raise SetupError(f"a search runs as a multirun: python train.py -m "
                         f"search={hydra.runtime.choices.get('search')} ...")
    return Pruning(hydra.sweeper.storage, hydra.sweeper.study_name, hydra.job.num if multirun else None,
                   hydra.sweeper.objective, instantiate(hydra.sweeper.pruner))
