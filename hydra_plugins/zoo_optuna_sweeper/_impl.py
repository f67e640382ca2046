"""The sweep: Optuna's ask-and-tell loop, one batch of ``n_jobs`` trials per launcher call.

Many workers (processes, machines, SLURM jobs) can work one study: give them the same
``storage`` (an RDB URL: sqlite for one machine, PostgreSQL for many) and ``study_name``.
- Each worker claims a number from the storage (``<study>:workers``, one trial per worker) and
  seeds its sampler with ``seed + number``, so workers never repeat each other's startup trials.
- Each trial runs in the sweep dir's ``trial-<number>`` folder, and its job gets the study, trial
  and worker as run tags (``trial_tags``: the config key that collects tags).
- While a trial runs, the worker records Optuna heartbeats; a worker that dies (SIGKILL, node
  loss) leaves RUNNING trials that the other workers mark FAIL after ``grace_period``.
- ``optimization_results.yaml`` in the sweep dir is rewritten after every batch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from zoo.errors import causes, one_line, redact_url

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"


class SweepError(Exception):
    """Bad sweep configuration: printed as one paragraph, exit status 2."""


def _stop(message: str) -> None:
    print(f"\nsweep error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def redact(url: str | None) -> str:
    """A storage URL without its password, for messages and the results file."""
    return redact_url(url) if url else "in-memory"


# --------------------------------------------------------------------------- search space


def to_distribution(override: Override) -> BaseDistribution:
    """A Hydra sweep override as an Optuna distribution:
    ``choice(a,b)`` and ``shuffle(range(...))`` categorical, ``range(start,stop,step)`` a stepped
    int or float range (stop excluded, as in Hydra), ``interval(lo,hi)`` a float range;
    ``tag(log, ...)`` samples on a log scale and ``tag(int, interval(...))`` integers."""
    key = override.get_key_element()
    value = override.value()
    try:
        if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
            return CategoricalDistribution(
                list(override.sweep_iterator(transformer=Transformer.encode))
            )
        if override.is_range_sweep():
            values = list(override.sweep_iterator())
            if not values:
                raise ValueError("the range is empty")
            step = abs(value.step)
            low, high = min(values), max(values)
            if all(isinstance(v, int) for v in values) and isinstance(step, int):
                return IntDistribution(low, high, step=step)
            return FloatDistribution(float(low), float(high), step=float(step))
        if override.is_interval_sweep():
            log_scale = "log" in value.tags
            if "int" in value.tags:
                return IntDistribution(int(value.start), int(value.end), log=log_scale)
            return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    except ValueError as exc:
        raise SweepError(f"{key}={override.input_line.split('=', 1)[-1]}: {exc}") from None
    raise SweepError(f"{override.input_line}: not a sweep Optuna can sample")


def search_space(
    params: DictConfig | None, arguments: Sequence[str]
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """(distributions by key, fixed override lines) from ``hydra.sweeper.params`` and the
    command line (which wins for a key given in both)."""
    lines: dict[str, str] = {}
    for key, value in (params or {}).items():
        lines[str(key)] = f"{key}={value}"
    parser = OverridesParser.create()
    for line in arguments:
        lines[line.split("=", 1)[0]] = line
    try:
        parsed = parser.parse_overrides(list(lines.values()))
    except HydraException as exc:
        raise SweepError(f"cannot parse the sweep: {one_line(exc)}") from None
    space, fixed = {}, []
    for override in parsed:
        if override.is_sweep_override():
            space[override.get_key_element()] = to_distribution(override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def _quote(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


# --------------------------------------------------------------------------- storage


def open_storage(url: str | None, heartbeat: int | None, grace: int | None):
    """The Optuna storage for ``hydra.sweeper.storage`` (None: in memory, this process only)."""
    if not url:
        return None
    from sqlalchemy.exc import ArgumentError, IntegrityError

    engine: dict[str, Any] = {"pool_pre_ping": True}
    if str(url).startswith("sqlite"):
        engine = {"connect_args": {"timeout": 60}}  # workers' writes wait for each other
    extra = {}
    if heartbeat:
        extra = {"heartbeat_interval": int(heartbeat), "grace_period": grace or 3 * int(heartbeat)}
    last: Exception | None = None
    for _ in range(5):  # two workers creating a new storage's tables at once: one retries
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's words
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(str(url), engine_kwargs=engine, **extra)
        except ArgumentError as exc:
            raise SweepError(
                f"hydra.sweeper.storage={redact(url)}: not a database URL ({one_line(exc)}); "
                f"e.g. sqlite:///optuna.db or postgresql://user:password@host/db"
            ) from None
        except Exception as exc:
            last = exc
            racing = isinstance(exc, IntegrityError) or any(
                s in str(exc) for s in ("already exists", "database is locked")
            )
            if not racing:
                break
            time.sleep(0.5)
    missing = next((e for e in causes(last) if isinstance(e, ModuleNotFoundError)), None)
    if missing is not None:
        raise SweepError(
            f"hydra.sweeper.storage={redact(url)}: its database driver is not installed "
            f"({missing}); for PostgreSQL: pip install 'zoo[server]'"
        )
    reason = one_line(getattr(last, "orig", None) or last)[:300]
    raise SweepError(f"hydra.sweeper.storage={redact(url)}: cannot open it ({reason})")


def claim_worker_id(storage, study_name: str) -> int:
    """This worker's number within the study: the number of its trial in ``<study>:workers``,
    which the storage hands out atomically (0, 1, 2, ... in the order workers join)."""
    book = optuna.create_study(
        study_name=f"{study_name}:workers", storage=storage, load_if_exists=True
    )
    ticket = book.ask()
    ticket.set_user_attr("host", socket.gethostname())
    ticket.set_user_attr("pid", os.getpid())
    book.tell(ticket, float(ticket.number))
    return ticket.number


def _trial_ids(storage, study, trials) -> list[int]:
    """The storage's ids of ``trials``, through the storage's public lookups (a heartbeat is
    recorded by trial id, which Optuna's ``Trial`` keeps private)."""
    if storage is None:
        return []
    study_id = storage.get_study_id_from_name(study.study_name)
    return [storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in trials]


class Heartbeat:
    """Records Optuna heartbeats for the running trials while a batch runs."""

    def __init__(self, storage, trial_ids: list[int]):
        self.storage, self.trial_ids = storage, trial_ids
        self.interval = getattr(storage, "heartbeat_interval", None) if storage else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.interval:
            self._beat()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="optuna-beat")
            self._thread.start()
        return self

    def _beat(self) -> None:
        for trial_id in self.trial_ids:
            try:
                self.storage.record_heartbeat(trial_id)
            except Exception as exc:  # a storage hiccup must not stop the trial
                log.debug("heartbeat failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# --------------------------------------------------------------------------- the sweep


class OptunaSweep(Sweeper):
    def __init__(
        self,
        sampler: DictConfig | None,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        worker_id: int | None,
        trial_tags: str | None,
        heartbeat_interval: int | None,
        grace_period: int | None,
    ) -> None:
        self.sampler_cfg = sampler
        directions = (
            list(direction)
            if isinstance(direction, Sequence) and not isinstance(direction, str)
            else [direction]
        )
        self.directions = [str(d).lower() for d in directions]
        self.storage_url = str(storage) if storage else None
        self.study_name = str(study_name) if study_name else None
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.max_failure_rate = float(max_failure_rate)
        self.params = params
        self.worker_id = worker_id
        self.trial_tags = trial_tags
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.job_idx = 0

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        try:
            self._check()
            space, fixed = search_space(self.params, arguments)
            storage = open_storage(self.storage_url, self.heartbeat_interval, self.grace_period)
            worker = self._worker(storage)
            sampler, seed = self._sampler(worker)
            study = optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                sampler=sampler,
                directions=self.directions,
                load_if_exists=True,
            )
        except SweepError as exc:
            _stop(str(exc))
        if list(study.directions) != [
            optuna.study.StudyDirection.MAXIMIZE
            if d == "maximize"
            else optuna.study.StudyDirection.MINIMIZE
            for d in self.directions
        ]:
            _stop(
                f"hydra.sweeper.direction={self.directions}: study '{study.study_name}' in "
                f"{redact(self.storage_url)} was created with "
                f"{[d.name.lower() for d in study.directions]}"
            )
        self.info = {"worker_id": worker, "sampler_seed": seed}
        log.info(
            "Optuna study '%s' in %s: worker %d, %s (seed %s), %d trials here, %d at a time",
            study.study_name,
            redact(self.storage_url),
            worker,
            type(sampler).__name__,
            seed,
            self.n_trials,
            self.n_jobs,
        )
        returns: list[JobReturn] = []
        done = failed = 0
        first_failure = ""
        while done < self.n_trials:
            if storage is not None and self.heartbeat_interval:
                optuna.storages.fail_stale_trials(study)
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [self._overrides(t, fixed, worker) for t in trials]
            try:
                self.validate_batch_is_legal(batch)
            except HydraException as exc:
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                self._write_results(study, done, failed)
                _stop(f"a trial's overrides do not compose: {one_line(exc)}")
            for trial, overrides in zip(trials, batch):
                log.info("Trial %d: %s", trial.number, " ".join(overrides))
            try:
                with Heartbeat(storage, _trial_ids(storage, study, trials)):
                    results = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            except BaseException as exc:  # Ctrl-C, SIGTERM, a job that exited the process
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                self._write_results(study, done, failed + len(trials))
                log.error(
                    "The sweep stopped during trial(s) %s (%s); they are marked FAIL in the "
                    "study, the results so far are in %s",
                    ", ".join(str(t.number) for t in trials),
                    type(exc).__name__,
                    self.sweep_dir / RESULTS_FILE,
                )
                raise
            self.job_idx += len(results)
            returns.extend(results)
            for trial, result in zip(trials, results):
                values, reason = self._values(result)
                if reason is None:
                    study.tell(trial, values)
                    log.info("Trial %d finished: %s", trial.number, values)
                else:
                    trial.set_user_attr("failure", reason[:1000])
                    study.tell(trial, state=TrialState.FAIL)
                    log.warning("Trial %d failed: %s", trial.number, reason)
                    failed += 1
                    first_failure = first_failure or f"trial {trial.number}: {reason}"
            done += len(trials)
            self._write_results(study, done, failed)
            if failed / done > self.max_failure_rate:
                _stop(
                    f"{failed} of {done} trials failed, more than hydra.sweeper."
                    f"max_failure_rate={self.max_failure_rate}; first: {first_failure}. The "
                    f"results so far are in {self.sweep_dir / RESULTS_FILE}"
                )
        self._report(study)
        return returns

    # ------------------------------------------------------------------ pieces

    def _check(self) -> None:
        bad = [d for d in self.directions if d not in ("minimize", "maximize")]
        if bad:
            raise SweepError(f"hydra.sweeper.direction={bad[0]!r}: use minimize or maximize")
        if self.storage_url and not self.study_name:
            raise SweepError(
                f"hydra.sweeper.storage={redact(self.storage_url)} needs hydra.sweeper."
                f"study_name=<name>: the workers of a shared study find it by name"
            )
        if self.n_trials < 1:
            raise SweepError(f"hydra.sweeper.n_trials={self.n_trials}: must be at least 1")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise SweepError(
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: must be in [0, 1]"
            )

    def _worker(self, storage) -> int:
        if self.worker_id is not None:
            return int(self.worker_id)
        if storage is None:
            return 0
        return claim_worker_id(storage, self.study_name)

    def _sampler(self, worker: int):
        cfg = self.sampler_cfg
        if not cfg:
            return optuna.samplers.TPESampler(), None
        seed = cfg.get("seed")
        kwargs = {}
        if seed is not None:
            seed = int(seed) + worker
            kwargs["seed"] = seed
        try:
            return instantiate(cfg, **kwargs), seed
        except Exception as exc:
            raise SweepError(f"hydra.sweeper.sampler: cannot build it ({one_line(exc)})") from None

    def _overrides(self, trial, fixed: list[str], worker: int) -> tuple[str, ...]:
        lines = [*fixed, *(f"{k}={v}" for k, v in trial.params.items())]
        lines.append(f"hydra.sweep.subdir=trial-{trial.number}")
        if self.trial_tags:
            prefix = f"++{self.trial_tags}"
            lines += [
                f"{prefix}.optuna_study={_quote(trial.study.study_name)}",
                f"{prefix}.optuna_trial={trial.number}",
                f"{prefix}.optuna_worker={worker}",
            ]
        return tuple(lines)

    def _values(self, result: JobReturn) -> tuple[list[float] | None, str | None]:
        if result.status != JobStatus.COMPLETED:
            try:  # re-raises the job's exception, after a line of its own on stderr: dropped
                with contextlib.redirect_stderr(io.StringIO()):
                    result.return_value  # noqa: B018
            except Exception as exc:
                return None, one_line(f"{type(exc).__name__}: {exc}")[:500]
            return None, f"the job ended {result.status.name}"
        value = result.return_value
        if value is None:
            return None, "the job returned no value to optimise (is a metric monitored?)"
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            return None, f"the job returned {value!r}, not a number"
        if len(values) != len(self.directions):
            return None, f"the job returned {len(values)} values for {len(self.directions)} goals"
        if any(v != v for v in values):
            return None, "the job returned NaN"
        return values, None

    def _write_results(self, study, done: int, failed: int) -> None:
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": study.study_name,
            "storage": redact(self.storage_url),
            **getattr(self, "info", {}),
            "this_worker": {"trials": done, "failed": failed},
            "study_trials": counts,
        }
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if complete and len(self.directions) == 1:
            best = study.best_trial
            results |= {
                "best_trial": best.number,
                "best_value": best.value,
                "best_params": dict(best.params),
            }
        elif complete:
            results["best_trials"] = [
                {"number": t.number, "values": t.values, "params": dict(t.params)}
                for t in study.best_trials
            ]
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.sweep_dir / f".{RESULTS_FILE}.{os.getpid()}"
        OmegaConf.save(OmegaConf.create(results), tmp)
        os.replace(tmp, self.sweep_dir / RESULTS_FILE)

    def _report(self, study) -> None:
        path = self.sweep_dir / RESULTS_FILE
        if len(self.directions) == 1 and any(
            t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)
        ):
            best = study.best_trial
            log.info(
                "Best trial of study '%s' so far: %d, value %s, params %s (%s)",
                study.study_name,
                best.number,
                best.value,
                best.params,
                path,
            )
