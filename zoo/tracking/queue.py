"""Tracking that rides out a tracking-server outage.

A training job's writes to mlflow (metrics, params, tags, artifacts, datasets, the run's end)
go through ``QueueingClient``. While the server answers they go straight to it. When a write
fails because the server cannot be reached (refused or timed-out connections, 5xx answers),
training goes on: that write and every later one are appended, in order, to an on-disk queue
in the job's output dir (``tracking-queue/``; artifacts are copied in, since the originals may
be temporary or overwritten), and the queue is delivered as soon as the server answers again.

If the server is still down when the job ends, the job exits non-zero saying so, and
``python -m zoo.tracking.delivery <output dir>`` delivers the queue later into the same run
(the job's end status included). Writes are
delivered at least once: a write whose answer was lost may arrive twice (a metric point).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from zoo.errors import TrackingError, one_line

log = logging.getLogger(__name__)

QUEUE_DIR = "tracking-queue"
OPS = "ops.jsonl"
DELIVERED = "delivered"
FAILED = "failed.jsonl"
META = "meta.json"
LOCK = "lock"

# MlflowClient's run writes. log_text, log_dict, log_figure, log_image and log_table write a
# temporary file and call log_artifact, so they are covered too.
WRITES = (
    "log_batch",
    "log_metric",
    "log_param",
    "set_tag",
    "delete_tag",
    "log_artifact",
    "log_artifacts",
    "log_inputs",
    "update_run",
    "set_terminated",
)
DEFERRED_MODEL = "zoo.log_model"  # the run's mlflow Model, logged from its checkpoint later


def is_outage(exc: BaseException) -> bool:
    """Whether an mlflow call failed because the server is unreachable or failing (worth
    queueing), rather than because the request was wrong."""
    import requests
    from mlflow.exceptions import MlflowException, RestException
    from requests.exceptions import RetryError

    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (requests.ConnectionError, requests.Timeout, RetryError)):
            return True
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if isinstance(err, requests.HTTPError) and err.response is not None:
            return err.response.status_code >= 500
        if isinstance(err, RestException):
            return err.get_http_status_code() >= 500
        if isinstance(err, MlflowException) and (
            err.error_code == "TEMPORARILY_UNAVAILABLE"  # e.g. sqlite: "database is locked"
            or "failed with error code 5" in str(err)
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


# --------------------------------------------------------------------------- (de)serialising


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    to_proto = getattr(value, "to_proto", None)
    if callable(to_proto):  # an mlflow entity (Metric, Param, RunTag, DatasetInput, ...)
        from google.protobuf.json_format import MessageToDict

        proto = to_proto()
        return {
            "__entity__": [type(value).__module__, type(value).__qualname__],
            "__proto__": type(proto).__name__,  # a message of mlflow.protos.service_pb2
            "fields": MessageToDict(proto, preserving_proto_field_name=True),
        }
    raise TypeError(f"cannot queue a {type(value).__name__} for mlflow")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict) and "__entity__" in value:
        from google.protobuf.json_format import ParseDict
        from mlflow.protos import service_pb2

        module, name = value["__entity__"]
        if not module.startswith("mlflow.entities"):
            raise ValueError(f"not an mlflow entity: {module}.{name}")  # import nothing else
        cls = getattr(importlib.import_module(module), name)
        proto_cls = getattr(service_pb2, value["__proto__"])
        return cls.from_proto(ParseDict(value["fields"], proto_cls()))
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- the queue


class DeliveryQueue:
    """An append-only, on-disk journal of mlflow writes and how many were delivered."""

    def __init__(self, folder: str | Path, tracking_uri: str, retry_interval: float = 10.0):
        self.folder = Path(folder)
        self.tracking_uri = tracking_uri
        self.retry_interval = retry_interval
        self.down_since: float | None = None
        self.last_error = ""
        self._lock = threading.RLock()
        self._next_try = 0.0
        self._written = self._count_lines(self.folder / OPS)
        self._delivered = self._read_delivered()
        self._job_lock = None

    # ---------------------------------------------------------------- state
    @property
    def pending(self) -> int:
        return self._written - self._delivered

    @staticmethod
    def _count_lines(path: Path) -> int:
        if not path.is_file():
            return 0
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def _read_delivered(self) -> int:
        try:
            return int((self.folder / DELIVERED).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_delivered(self) -> None:
        tmp = self.folder / (DELIVERED + ".tmp")
        tmp.write_text(str(self._delivered))
        os.replace(tmp, self.folder / DELIVERED)

    def _start(self, run_id: str | None) -> None:
        if self._job_lock is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / META
        if not meta.exists():
            meta.write_text(json.dumps({"tracking_uri": self.tracking_uri, "run_id": run_id}))
        self._job_lock = open(self.folder / LOCK, "a")  # held while the job lives
        flock(self._job_lock, blocking=True)

    def close(self) -> None:
        if self._job_lock is not None:
            self._job_lock.close()
            self._job_lock = None

    # ---------------------------------------------------------------- writing
    def append(self, method: str, kwargs: dict[str, Any]) -> None:
        with self._lock:
            self._start(kwargs.get("run_id"))
            seq = self._written
            kwargs = dict(kwargs)
            if method in ("log_artifact", "log_artifacts") and kwargs.get("local_path"):
                kwargs["local_path"] = self._keep(Path(kwargs["local_path"]), seq)
            line = json.dumps({"seq": seq, "method": method, "kwargs": _encode(kwargs)})
            with open(self.folder / OPS, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._written += 1

    def _keep(self, src: Path, seq: int) -> str:
        """A copy of an artifact as it is now (not a link: files may be rewritten in place)."""
        dst = self.folder / "blobs" / f"{seq:08d}" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return str(dst)

    def outage(self, exc: BaseException) -> None:
        with self._lock:
            self.last_error = _reason(exc)
            self._next_try = time.monotonic() + self.retry_interval
            if self.down_since is None:
                self.down_since = time.time()
                log.warning(
                    "The tracking server %s is not answering (%s). Training goes on; tracking "
                    "records are queued in %s and delivered when it answers again.",
                    self.tracking_uri,
                    self.last_error,
                    self.folder,
                )

    @property
    def lock(self) -> threading.RLock:
        """Held while a write is appended or the queue delivered (re-entrant)."""
        return self._lock

    def retry_now(self) -> None:
        """The next ``due`` asks the server at once, whatever the retry interval says."""
        self._next_try = 0.0

    # ---------------------------------------------------------------- delivering
    def due(self) -> bool:
        """Whether to try the server again: the retry interval has passed and a quick health
        check (http servers) answers, so that a down server costs training no waiting."""
        if time.monotonic() < self._next_try:
            return False
        if not self.tracking_uri.startswith(("http://", "https://")):
            return True
        import requests

        try:
            ok = requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=2).ok
        except requests.RequestException:
            ok = False
        if not ok:
            self._next_try = time.monotonic() + self.retry_interval
        return ok

    def deliver(self, client: MlflowClient, deliver_model=None) -> bool:
        """Deliver pending writes in order; True once the queue is empty. Stops at the first
        outage (to retry later); a write the server refuses is set aside in failed.jsonl."""
        with self._lock:
            if not self.pending:
                return True
            with open(self.folder / OPS) as f:
                ops = [json.loads(line) for line in f if line.strip()][self._delivered :]
            done = 0
            for op in ops:
                try:
                    self._apply(client, op, deliver_model)
                except Exception as exc:
                    if is_outage(exc):
                        self.outage(exc)
                        self._write_delivered()
                        return False
                    self._set_aside(op, exc)
                self._delivered += 1
                done += 1
                if done % 50 == 0:
                    self._write_delivered()
                blob = self.folder / "blobs" / f"{op['seq']:08d}"
                if blob.exists():
                    shutil.rmtree(blob, ignore_errors=True)
            self._write_delivered()
            if self.down_since is not None:
                log.warning(
                    "The tracking server %s answers again: delivered %d queued records (down "
                    "for %.0f s).",
                    self.tracking_uri,
                    done,
                    time.time() - self.down_since,
                )
            self.down_since = None
            return True

    @staticmethod
    def _apply(client: MlflowClient, op: dict, deliver_model) -> None:
        kwargs = _decode(op["kwargs"])
        if op["method"] == DEFERRED_MODEL:
            if deliver_model is None:
                raise TrackingError(
                    "the run's model can only be logged by python -m zoo.tracking.delivery"
                )
            deliver_model(client, **kwargs)
            return
        if op["method"] not in WRITES:
            raise ValueError(f"unknown queued call {op['method']!r}")
        getattr(MlflowClient, op["method"])(client, **kwargs)

    def _set_aside(self, op: dict, exc: Exception) -> None:
        log.warning(
            "The tracking server refused a queued %s (%s); kept in %s.",
            op["method"],
            _reason(exc),
            self.folder / FAILED,
        )
        with open(self.folder / FAILED, "a") as f:
            f.write(json.dumps({**op, "error": _reason(exc)}) + "\n")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(str(exc))[:200]}"


def flock(handle, blocking: bool) -> bool:
    """An exclusive lock on an open file, released when it closes; False if another process
    holds it and ``blocking`` is False."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


# --------------------------------------------------------------------------- the client


class QueueingClient(MlflowClient):
    """An MlflowClient whose run writes survive a server outage (see the module docstring).
    Reads are untouched. Without ``queue_dir`` it is a plain MlflowClient."""

    def __init__(self, tracking_uri: str, queue_dir: str | Path | None = None, **kwargs):
        super().__init__(tracking_uri, **kwargs)
        self.queue = DeliveryQueue(queue_dir, tracking_uri) if queue_dir else None
        self._local = threading.local()

    def _write(self, method: str, *args, **kwargs):
        base = getattr(MlflowClient, method)
        if self.queue is None or getattr(self._local, "busy", False):
            return base(self, *args, **kwargs)
        bound = inspect.signature(base).bind(self, *args, **kwargs)
        call = {k: v for k, v in bound.arguments.items() if k != "self"}
        call.update(call.pop("kwargs", {}) or {})
        _stamp(method, call)  # the time of the call, not of a later delivery
        self._local.busy = True
        try:
            with self.queue.lock:
                if self.queue.pending and not (self.queue.due() and self.queue.deliver(self)):
                    self.queue.append(method, call)
                    return None
                try:
                    return base(self, **call)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    self.queue.outage(exc)
                    self.queue.append(method, call)
                    return None
        finally:
            self._local.busy = False

    def defer_model(self, run_id: str, checkpoint: str, registered_model_name: str | None):
        """Queue the logging of the run's mlflow Model from its best checkpoint."""
        self.queue.append(
            DEFERRED_MODEL,
            {
                "run_id": run_id,
                "local_path": checkpoint,
                "registered_model_name": registered_model_name,
            },
        )

    @property
    def pending(self) -> int:
        return self.queue.pending if self.queue is not None else 0

    def flush(self, wait_s: float = 0.0) -> bool:
        """Try to deliver the queue, retrying for up to ``wait_s``; True when it is empty."""
        if self.queue is None or not self.queue.pending:
            return True
        deadline = time.monotonic() + wait_s
        self.queue.retry_now()
        while True:
            self._local.busy = True
            try:
                if self.queue.due() and self.queue.deliver(self):
                    return True
            finally:
                self._local.busy = False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.queue.retry_interval / 2, left))


def _stamp(method: str, call: dict[str, Any]) -> None:
    now = int(time.time() * 1000)
    if method == "log_metric" and call.get("timestamp") is None:
        call["timestamp"] = now
    if method == "set_terminated" and call.get("end_time") is None:
        call["end_time"] = now


for _name in WRITES:

    def _make(name: str):
        base = getattr(MlflowClient, name)

        @functools.wraps(base)
        def method(self, *args, **kwargs):
            return self._write(name, *args, **kwargs)

        return method

    setattr(QueueingClient, _name, _make(_name))
