"""mlflow helpers: the run of a training job, params without truncation, tags, artifacts,
figures, and run lookup for evaluate.py. All writes go through MlflowClient with an explicit
run id (no global "active run"), so multirun jobs cannot leak into each other. No Lightning at
module level: a process that only opens a store or looks a run up stays light."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

import zoo
from zoo.config import iter_flat
from zoo.errors import ConfigError, TrackingError, causes, one_line, redact_url
from zoo.fetch import download, resolve_tracking_uri

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config/config.yaml"
TAG_KIND = "zoo.kind"
TAG_BEST_CKPT = "zoo.best_checkpoint"
TAG_MODEL_URI = "zoo.model_uri"
TAG_REGISTERED = "zoo.registered_model"


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(open_store(uri))


# --------------------------------------------------------------------------- store start-up

SERVER_CHECK_BUDGET_S = 10.0  # retries of the start-up check; with start-up a job fails in ~25 s
_ready_stores: set[str] = set()
_ready_lock = threading.Lock()


def open_store(uri: str | None = None) -> str:
    """The resolved tracking URI, made ready once per process before anything else uses it.

    - sqlite: the database is created and migrated under an exclusive file lock beside it, so
      any number of jobs may start at once on a new store (mlflow's schema migration is not
      safe against concurrent first use: "duplicate column name: step").
    - http(s): the server must answer within SERVER_CHECK_BUDGET_S (a few short attempts),
      else one clear error naming the URI, instead of mlflow's retries (minutes) and a raw
      urllib error.
    """
    uri = resolve_tracking_uri(uri)
    with _ready_lock:
        if uri in _ready_stores:
            return uri
        if uri.startswith("sqlite:///"):
            _init_sqlite_store(uri)
        elif uri.startswith(("http://", "https://")):
            _check_server(uri)
            _bound_mlflow_retries()
        elif uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
            _check_database(uri)
        _ready_stores.add(uri)
    return uri


def _init_sqlite_store(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from zoo.queueing import flock

    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path.parent.is_dir():
        raise ConfigError(
            f"tracking store {uri}: the folder {path.parent} does not exist; create it or set "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI to a store in an existing folder"
        )
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        flock(lock, blocking=True)  # released when the file closes
        try:
            MlflowClient(uri).search_experiments(max_results=1)  # creates + migrates, cached
        except Exception as exc:
            raise TrackingError(
                f"tracking store {uri} cannot be opened ({type(exc).__name__}: "
                f"{one_line(str(exc))[:300]})"
            ) from exc


def _check_database(uri: str) -> None:
    """A database store used directly (no server): reachable, with its driver installed."""
    from mlflow.tracking import MlflowClient

    shown = redact_url(uri)
    try:
        # one quick connection first: mlflow retries a failed connection 10 times (~3 min)
        import sqlalchemy

        timeout = {"connect_timeout": 10} if uri.startswith("postgresql") else {}
        engine = sqlalchemy.create_engine(uri, connect_args=timeout)
        with engine.connect():
            pass
        engine.dispose()
        MlflowClient(uri).search_experiments(max_results=1)  # creates + migrates a new one
    except Exception as exc:
        chain = list(causes(exc))
        if any(isinstance(e, ModuleNotFoundError) for e in chain):
            hint = "its database driver is not installed: pip install 'zoo[server]'"
        else:
            hint = one_line(str(getattr(chain[-1], "orig", None) or chain[-1]))[:300]
        raise TrackingError(
            f"tracking store {shown} cannot be opened ({hint}). Check the database URL in "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI, or log to a local store such as "
            "sqlite:///mlflow.db. Nothing was logged."
        ) from None


def _check_server(uri: str) -> None:
    """Any HTTP answer counts as reachable (mlflow's own calls then report API errors);
    refused or timed-out connections are retried with short waits until the budget is spent."""
    import requests

    start = time.monotonic()
    attempts, delay, reason = 0, 0.5, ""
    while True:
        attempts += 1
        left = SERVER_CHECK_BUDGET_S - (time.monotonic() - start)
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=max(1.0, min(5.0, left)))
            _check_login(uri)
            return
        except requests.RequestException as exc:
            reason = _connection_reason(exc)
        left = SERVER_CHECK_BUDGET_S - (time.monotonic() - start)
        if left <= delay:
            break
        time.sleep(delay)
        delay = min(delay * 2, 4.0)
    port = urlsplit(uri).port or 5000
    raise TrackingError(
        f"the mlflow tracking server {uri} is not reachable ({reason}; {attempts} attempts in "
        f"{time.monotonic() - start:.0f} s). Start it (e.g. `mlflow server --host 127.0.0.1 "
        f"--port {port} --backend-store-uri sqlite:///mlflow.db`), or set "
        "tracking.tracking_uri / MLFLOW_TRACKING_URI to a running server or a local store such "
        "as sqlite:///mlflow.db, or train without tracking with logger=none. Nothing was logged."
    )


def _check_login(uri: str) -> None:
    """A server with authentication (``mlflow server --app-name basic-auth``) answers 401 to
    requests without valid credentials: say so once, naming the variables mlflow reads."""
    import requests

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    answer = requests.get(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
        params={"max_results": 1},
        auth=auth,
        headers=headers,
        timeout=10,
    )
    if answer.status_code in (401, 403):
        who = f"the credentials of user {user!r} (MLFLOW_TRACKING_USERNAME)" if user else None
        raise TrackingError(
            f"the mlflow tracking server {uri} refused "
            + (
                f"{who}: check MLFLOW_TRACKING_PASSWORD."
                if who
                else "a request without "
                "credentials: it requires a login. Set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)."
            )
            + f" (HTTP {answer.status_code}; nothing was logged)"
        )


# mlflow retries a failed request 7 times with exponential backoff and a 120 s timeout: minutes
# per call while a server is down. A job bounds that (the user's own settings win); what cannot
# be delivered is queued (zoo.queueing) instead of waited for.
MLFLOW_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _bound_mlflow_retries() -> None:
    for key, value in MLFLOW_HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def _connection_reason(exc: Exception) -> str:
    import requests

    if isinstance(exc, requests.Timeout):
        return "no answer before the timeout"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        for key in ("Connection refused", "Name or service not known", "No route to host"):
            if key in text:
                return key.lower()
        return "connection failed"
    return type(exc).__name__


def max_param_length() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except ImportError:  # pragma: no cover - very old mlflow
        return 500


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def flatten_params(cfg: DictConfig | dict, artifact: str = CONFIG_ARTIFACT) -> dict[str, str]:
    """Flatten a config into mlflow params. Values longer than mlflow allows are not cut:
    the param says where the whole value is (the config artifact)."""
    limit = max_param_length()
    out: dict[str, str] = {}
    for key, value in iter_flat(cfg):
        text = _param_value(value)
        if len(text) > limit:
            text = (
                f"<{len(text)} characters: too long for an mlflow param; see artifact {artifact}>"
            )
        out[key[:250]] = text
    return out


def system_tags(cfg: DictConfig, commit: str) -> dict[str, str]:
    """mlflow's own system tags, so the UI shows the source, its commit, the user and the
    experiment's description."""
    import getpass

    from mlflow.entities import SourceType

    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    tags = {
        "mlflow.source.type": SourceType.to_string(SourceType.LOCAL),
        "mlflow.user": getpass.getuser(),
    }
    if script is not None and script.is_file():
        tags["mlflow.source.name"] = str(script)
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
        repo = _git(["remote", "get-url", "origin"])
        if repo:
            tags["mlflow.source.git.repoURL"] = repo
    description = cfg.get("description")
    if description:
        tags["mlflow.note.content"] = str(description).strip()
    return tags


def _git(args: list[str]) -> str | None:
    here = Path(zoo.__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    here = Path(zoo.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {
        "model/params/total": total,
        "model/params/trainable": trainable,
        "model/params/non_trainable": total - trainable,
    }
    extra = getattr(model, "parameter_groups", None)
    if callable(extra):
        for name, module in extra().items():
            out[f"model/params/{name}"] = sum(p.numel() for p in module.parameters())
    return out


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Log params in batches; keys already logged with another value (a resumed run whose
    config changed) are not re-logged but returned as {key: (old, new)}."""
    from mlflow.entities import Param

    from zoo.queueing import is_outage

    try:
        existing = mlflow_client.get_run(run_id).data.params
    except Exception as exc:  # server down: log them all (the queue delivers them later)
        if not is_outage(exc):
            raise
        existing = {}
    changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
    todo = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(todo), 100):
        mlflow_client.log_batch(run_id, params=todo[i : i + 100])
    return changed


class TrainingRun:
    """The mlflow side of one training job: tags, params, config and checkpoint artifacts, and
    the run's final status. A no-op without an mlflow logger and on non-zero ranks."""

    def __init__(self, logger: MLFlowLogger | None):
        from lightning.pytorch.utilities import rank_zero_only

        self.logger = logger if rank_zero_only.rank == 0 else None
        self._system_metrics = None

    @property
    def active(self) -> bool:
        return self.logger is not None

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger is not None else None

    @property
    def client(self):
        return self.logger.experiment if self.logger is not None else None

    def start(self, cfg: DictConfig, model, resumed: bool = False) -> None:
        if self.logger is None:
            return
        c, run_id = self.client, self.run_id
        if resumed:
            c.update_run(run_id, status="RUNNING")
        choices = _hydra_choices()
        commit = git_commit()
        tags = system_tags(cfg, commit)
        tags |= {
            "zoo.model": choices.get("model") or str(OmegaConf.select(cfg, "model._target_")),
            "zoo.data": choices.get("data") or str(OmegaConf.select(cfg, "data._target_")),
            "zoo.experiment": str(cfg.get("name") or choices.get("experiment")),
            "zoo.version": zoo.__version__,
            "zoo.command": " ".join(shlex.quote(a) for a in sys.argv),
            TAG_KIND: "train",
            "zoo.git_commit": commit,
        }
        tags.update({f"zoo.tag.{k}": str(v) for k, v in (cfg.get("tags") or {}).items()})
        parent = OmegaConf.select(cfg, "tracking.parent_run_id")
        if parent:  # a study's fold: the mlflow UI nests it under the study's run
            tags["mlflow.parentRunId"] = str(parent)
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
        yaml_text = OmegaConf.to_yaml(cfg, resolve=True)
        if resumed:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            c.log_text(run_id, yaml_text, f"config/config-resume-{stamp}.yaml")
            if cfg.get("ckpt_path"):
                c.set_tag(run_id, "zoo.resumed_from", str(cfg.ckpt_path))
        else:
            c.log_text(run_id, yaml_text, CONFIG_ARTIFACT)
        overrides = _hydra_overrides()
        if overrides is not None:
            c.log_text(run_id, "\n".join(overrides) + "\n", "config/overrides.txt")
        changed = log_params(c, run_id, flatten_params(cfg))
        if changed:
            log.warning(
                "Resumed run %s: %d config value(s) changed since the first attempt (kept the "
                "original params; see config/config-resume-*.yaml): %s",
                run_id,
                len(changed),
                ", ".join(sorted(changed)),
            )
        counts = count_parameters(model)
        log_params(c, run_id, {k: str(v) for k, v in counts.items()})

    def start_system_metrics(self, sampling_interval: float = 10.0) -> None:
        """mlflow's system metrics (CPU, memory, disk, network; GPU with pynvml) for this run."""
        if self.logger is None or self._system_metrics is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_metrics = SystemMetricsMonitor(
            self.run_id, sampling_interval=sampling_interval, samples_before_logging=1
        )
        self._system_metrics.start()

    def stop_system_metrics(self) -> None:
        """Stop the monitor and log the samples it took since its last point.

        mlflow's monitor drops the samples of an unfinished interval when it stops, so a
        run shorter than one interval would get no system metrics at all.
        """
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is None:
            return
        monitor.finish()
        try:
            if any(getattr(m, "_metrics", None) for m in monitor.monitors):
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as e:  # the run's own results matter more than its last CPU sample
            log.warning("Could not log the last system metrics sample: %s", e)

    def log_output(self, item) -> None:
        """Log one record a model emitted (``zoo.outputs``: Figure, File, Tag, Count)."""
        from zoo.outputs import Count, Figure, File, Tag

        if self.logger is None:
            return
        c, run_id = self.client, self.run_id
        if isinstance(item, Figure):
            from zoo.plotting import close

            fig = item.build()
            try:
                c.log_figure(run_id, fig, item.path)
            finally:
                close(fig)
        elif isinstance(item, File):
            folder, name = os.path.split(item.path)
            with tempfile.TemporaryDirectory(prefix="zoo-file-") as tmp:
                local = Path(tmp) / name
                if item.write is not None:
                    item.write(local)
                else:
                    shutil.copyfile(item.source, local)
                c.log_artifact(run_id, str(local), folder or None)
        elif isinstance(item, Tag):
            c.set_tag(run_id, item.key, item.value)
        elif isinstance(item, Count):
            c.log_metric(run_id, item.key, float(item.value), step=0)
        else:
            raise TypeError(f"cannot log {type(item).__name__} to mlflow")

    def log_datasets(self, infos) -> None:
        """The data module's splits as the run's inputs (the UI's "Datasets" column)."""
        if self.logger is None or not infos:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for info in infos:
            # what mlflow.data's local artifact source writes for a path
            dataset = Dataset(
                name=info.name,
                digest=info.digest,
                source_type="local",
                source=json.dumps({"uri": info.source}),
                profile=json.dumps({"num_samples": info.num_samples}),
            )
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", info.context)]))
        for attempt in range(5):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as exc:
                # jobs logging the same dataset at once race in mlflow's store ("UNIQUE
                # constraint failed: datasets..." / "duplicate key"): the loser finds it next time
                text = str(exc)
                if attempt == 4 or not ("UNIQUE constraint" in text or "duplicate key" in text):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_model(self, module, cfg: DictConfig, datamodule, registered_model_name=None):
        """The module as an mlflow Model of this run (``zoo.serving``); returns its ModelInfo."""
        if self.logger is None:
            return None
        from zoo.serving import log_model

        info = log_model(
            module, cfg, datamodule, self.run_id, self.logger._tracking_uri, registered_model_name
        )
        self.client.set_tag(self.run_id, TAG_MODEL_URI, info.model_uri)
        if registered_model_name:
            self.client.set_tag(
                self.run_id,
                TAG_REGISTERED,
                f"models:/{registered_model_name}/{info.registered_model_version}",
            )
        return info

    def log_artifact(self, path: str | Path, artifact_dir: str) -> str | None:
        if self.logger is None or not path or not Path(path).is_file():
            return None
        self.client.log_artifact(self.run_id, str(path), artifact_dir)
        return f"{artifact_dir}/{Path(path).name}"

    def log_best_checkpoint(self, path: str | Path) -> str | None:
        artifact = self.log_artifact(path, "checkpoints")
        if artifact:
            self.client.set_tag(self.run_id, TAG_BEST_CKPT, artifact)
        return artifact

    def set_tag(self, key: str, value: str | None) -> None:
        if self.logger is not None and value is not None:
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.logger is not None and self.logger._initialized:
            self.client.set_terminated(self.run_id, status)

    @contextmanager
    def guard(self, stopper=None) -> Iterator[None]:
        """Mark the run KILLED (a signal: ``stopper`` is the job's ``zoo.faults.StopSafely``)
        or FAILED, with the reason in tag ``zoo.failure``, if the job dies; what was logged
        stays."""
        try:
            yield
        except BaseException as exc:
            killed = isinstance(exc, KeyboardInterrupt) or (
                stopper is not None and stopper.status == "KILLED"
            )
            if not killed:
                reason = getattr(stopper, "failure", None) or (
                    f"{type(exc).__name__}: {one_line(str(exc))[:400]}"
                )
                self._safe(lambda: self.set_tag("zoo.failure", reason))
            self._safe(lambda: self.finish("KILLED" if killed else "FAILED"))
            raise

    # ---------------------------------------------------------------- outages
    @property
    def pending(self) -> int:
        """Writes queued while the tracking server does not answer (``zoo.queueing``)."""
        return getattr(self.client, "pending", 0) if self.logger is not None else 0

    def flush(self, wait_s: float = 0.0) -> bool:
        """Deliver queued writes, retrying for up to ``wait_s``; True when none are left."""
        flush = getattr(self.client, "flush", None)
        return flush(wait_s) if callable(flush) else True

    def defer_model(self, checkpoint: str, registered_model_name: str | None) -> None:
        """Queue the logging of the mlflow Model (the server is down at the end of the job)."""
        self.client.defer_model(self.run_id, checkpoint, registered_model_name)

    @property
    def queue_dir(self):
        queue = getattr(self.client, "queue", None)
        return queue.folder if queue is not None else None

    def _safe(self, write) -> None:
        try:
            write()
        except Exception as exc:  # never hide the original error
            log.warning("could not update mlflow run %s: %s", self.run_id, exc)


def _hydra_choices() -> dict[str, str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except (ValueError, ImportError):
        return {}


def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError):
        return None


# --------------------------------------------------------------------------- run lookup


def create_run(uri: str | None, experiment_name: str, run_name: str, tags: dict[str, str]) -> str:
    """A new run (experiment created on first use) outside any training job; returns its id."""
    exp_id = ensure_experiment(uri, experiment_name)
    return client(uri).create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def ensure_experiment(uri: str | None, name: str) -> str:
    """The id of experiment ``name``, created if missing; safe when several jobs create it at
    once (the losers of the race find the winner's)."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except MlflowException:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def get_run(run_id: str, uri: str | None = None):
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        return c, c.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(
            f"run_id={run_id}: no such mlflow run in tracking store {resolve_tracking_uri(uri)} "
            f"({str(exc).splitlines()[0]})"
        ) from None


def download_artifact(
    run_id: str, artifact_path: str, uri: str | None = None, dst: str | None = None
) -> Path:
    return download(
        f"runs:/{run_id}/{artifact_path}",
        resolve_tracking_uri(uri),
        f"run {run_id}: could not download artifact '{artifact_path}'",
        dst,
    )


def load_run_config(run_id: str, uri: str | None = None) -> DictConfig:
    """The resolved config a training run logged (config/config.yaml)."""
    path = download_artifact(run_id, CONFIG_ARTIFACT, uri)
    return OmegaConf.load(path)


@dataclass
class LocalModel:
    """A zoo model downloaded from mlflow: its artifacts (name -> local file) and source run."""

    path: Path
    artifacts: dict[str, Path]
    run_id: str | None


def download_model(model_uri: str, uri: str | None = None) -> LocalModel:
    """Download a logged or registered zoo model (``models:/<name>/<version>``,
    ``runs:/<run id>/model``, ``models:/<model id>``) and find its config and weights."""
    from mlflow.models import Model

    tracking_uri = open_store(uri)
    failure = f"model_uri={model_uri}: no such model in tracking store {tracking_uri}"
    local = download(model_uri, tracking_uri, failure)
    try:
        meta = Model.load(str(local))
    except Exception as exc:
        raise ConfigError(f"{failure} ({type(exc).__name__}: {one_line(str(exc))[:300]})") from None
    flavor = meta.flavors.get("python_function", {})
    artifacts = {
        name: local / spec["path"] for name, spec in (flavor.get("artifacts") or {}).items()
    }
    if not {"config", "weights"} <= set(artifacts):
        raise ConfigError(
            f"model_uri={model_uri}: not a zoo model (its python_function flavour has no config "
            "and weights artifacts)"
        )
    return LocalModel(local, artifacts, meta.run_id)
