"""The tracking store: its URI, its start-up checks (sqlite created under a lock, a server's
health and login) and new runs and experiments."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from zoo.errors import ConfigError, TrackingError, causes, one_line, redact_url

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # mlflow's own default store


def resolve_tracking_uri(cfg_value: str | None = None) -> str:
    """Config key beats MLFLOW_TRACKING_URI beats mlflow's default sqlite store."""
    return cfg_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(open_store(uri))


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow's global tracking URI set to ``uri`` for a block (``Model.log`` reads only the
    global one); the previous URI and MLFLOW_TRACKING_URI (which mlflow also sets) come back."""
    import mlflow

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets the variable
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


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

    from zoo.tracking.queue import flock

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
# be delivered is queued (zoo.tracking.queue) instead of waited for.
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
