"""``python -m zoo.tracking.delivery <output dir>``: deliver the tracking records a job queued
while its mlflow server was down (``zoo.tracking.queue``) into the same run, its mlflow Model
and end status included."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from zoo.errors import TrackingError, ZooError
from zoo.tracking.queue import LOCK, META, QUEUE_DIR, DeliveryQueue, flock

log = logging.getLogger(__name__)


def find_queue(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path, path / QUEUE_DIR):
        if (candidate / META).is_file():
            return candidate
    raise TrackingError(
        f"{path}: no tracking queue here (expected {QUEUE_DIR}/{META} in a job's output dir)"
    )


def deliver_later(path: str | Path, tracking_uri: str | None = None, resumed: bool = False) -> int:
    """Deliver a finished job's queue into its run; returns how many records were delivered.
    ``resumed``: a job resuming that run delivers it, so a run the dead job left RUNNING is
    left for the resumed job rather than marked FAILED."""
    from zoo import tracking

    folder = find_queue(path)
    meta = json.loads((folder / META).read_text())
    uri = tracking.open_store(tracking_uri or meta["tracking_uri"])
    with open(folder / LOCK, "a") as lock:
        if not flock(lock, blocking=False):
            raise TrackingError(
                f"{folder}: the job that owns this queue is still running; it delivers the queue "
                "itself when the server answers"
            )
        queue = DeliveryQueue(folder, uri, retry_interval=0.0)
        before = queue.pending
        client = MlflowClient(uri)
        if not queue.deliver(client, deliver_model=_log_model_from_checkpoint):
            raise TrackingError(
                f"the tracking server {uri} still does not answer ({queue.last_error}); "
                f"{queue.pending} records remain queued in {folder}"
            )
        run_id = meta.get("run_id")
        if run_id and not resumed and client.get_run(run_id).info.status == "RUNNING":
            # the job died without ending its run (kill -9 during the outage)
            client.set_tag(run_id, "zoo.failure", "the job ended without finishing its run")
            client.set_terminated(run_id, "FAILED")
        return before


def deliver_before_resume(checkpoint: str | Path, output_dir: str | Path) -> int:
    """A job resumed from ``checkpoint`` into another output dir first delivers what the job
    that wrote it left queued (a kill during an outage, or a sqlite lock wait past mlflow's
    timeout): its writes would otherwise stay in the old folder, never sent. While the server
    is still down they stay queued there, with a warning naming the delivery command."""
    old = Path(checkpoint).resolve().parent.parent  # <output dir>/checkpoints/last.ckpt
    folder = old / QUEUE_DIR
    if old == Path(output_dir).resolve() or not (folder / META).is_file():
        return 0
    meta = json.loads((folder / META).read_text())
    if not DeliveryQueue(folder, meta["tracking_uri"]).pending:
        return 0
    try:
        n = deliver_later(folder, resumed=True)
    except TrackingError as exc:
        log.warning(
            "the resumed job's earlier writes stay queued (%s); deliver them later with: "
            "python -m zoo.tracking.delivery %s",
            exc,
            old,
        )
        return 0
    log.info("delivered %d tracking records the job before the resume had queued in %s", n, old)
    return n


def _log_model_from_checkpoint(client, run_id, local_path, registered_model_name=None) -> None:
    from omegaconf import OmegaConf

    from zoo import tracking
    from zoo.config import build
    from zoo.faults import read_checkpoint
    from zoo.tracking.serving import log_model

    ckpt = read_checkpoint(local_path)
    cfg = OmegaConf.create(ckpt["zoo"]["config"])
    model = build(cfg.model, "model")
    model.load_state_dict(ckpt["state_dict"])
    datamodule = build(cfg.data, "data")
    info = log_model(
        model, cfg, datamodule, run_id, client.tracking_uri, registered_model_name or None
    )
    client.set_tag(run_id, tracking.TAG_MODEL_URI, info.model_uri)
    if registered_model_name:
        client.set_tag(
            run_id,
            tracking.TAG_REGISTERED,
            f"models:/{registered_model_name}/{info.registered_model_version}",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zoo.tracking.delivery",
        description="Deliver the tracking records a job queued while its mlflow server was "
        "down into the same run.",
    )
    parser.add_argument("path", help="the job's output dir (or its tracking-queue/ folder)")
    parser.add_argument("--tracking-uri", help="deliver to this server instead of the job's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        n = deliver_later(args.path, args.tracking_uri)
    except ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"delivered {n} queued tracking records")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
