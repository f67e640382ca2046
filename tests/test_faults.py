"""Faults as real processes meet them: an unreachable tracking server, and many jobs starting at
once on one new sqlite store."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import (
    ROOT,
    artifacts,
    cli_env,
    free_port,
    run_cli,
    start_cli,
    start_mlflow_server,
    stop_mlflow_server,
)
from zoo import faults, tracking
from zoo.errors import ConfigError
from zoo.pipeline import read_checkpoint


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.faults
def test_unreachable_tracking_server_fails_fast_with_one_paragraph(tmp_path, data_dir):
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    proc = run_cli("train.py", ["debug=fast"], tmp_path, {"MLFLOW_TRACKING_URI": uri}, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the mlflow tracking server {uri} is not reachable (connection refused" in proc.stderr
    # the check itself gives up within its budget; the process around it (imports: 10-25 s
    # here, more on a loaded machine) ends far below mlflow's own retries (259 s measured)
    checked = re.search(r"(\d+) attempts in (\d+) s", proc.stderr)
    assert checked and int(checked.group(2)) <= tracking.SERVER_CHECK_BUDGET_S + 2, proc.stderr
    assert elapsed < 120, f"took {elapsed:.0f} s to give up on {uri}"
    assert "mlflow server --host 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # failed before any training


def test_sqlite_store_in_a_missing_folder_is_a_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=f"the folder {tmp_path / 'nope'} does not exist"):
        tracking.open_store(uri)


OPEN_AT_ONCE = """
import os, sys, time
from zoo import tracking
uri, go, name = sys.argv[1], sys.argv[2], sys.argv[3]
print("ready", flush=True)
while not os.path.exists(go):  # every process reaches the store at the same moment
    time.sleep(0.001)
print(tracking.create_run(uri, "zoo", name, {}))
"""


@pytest.mark.multiprocess
def test_processes_opening_a_new_sqlite_store_at_the_same_moment(tmp_path):
    """mlflow's first use of a new sqlite store migrates its schema, which fails when processes
    race ("duplicate column name: step": 5 and 6 of 6 processes failed in two tries here
    without the lock). open_store creates it once, under a file lock; the experiment too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_ONCE, uri, str(go), f"job{i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for p in procs:  # all imported and waiting
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    exp = MlflowClient(uri).get_experiment_by_name("zoo")
    runs = MlflowClient(uri).search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"job{i}" for i in range(4)]


@pytest.mark.multiprocess
def test_four_training_jobs_start_at_once_on_a_new_store(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = []
    for i in range(4):
        out = tmp_path / f"job{i}"
        out.mkdir()
        procs.append(
            start_cli(
                "train.py",
                ["debug=fast", f"hydra.run.dir={out}"],
                out,
                {"MLFLOW_TRACKING_URI": uri},
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert len(runs) == 4
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in runs)


# --------------------------------------------------------------------------- kill and resume

# a short seeded, deterministic EEG run; every epoch ends with last.ckpt
RESUMABLE = [
    "data.subset=1",
    "data.num_workers=0",
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=4",
    "trainer.limit_test_batches=4",
    "trainer.deterministic=true",
    "seed=7",
    "callbacks.early_stopping=null",
    "callbacks.rich_progress_bar=null",
    "tracking.log_model=false",
]


def _epoch_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


def _wait_until(proc, done, what: str, timeout: float = 300) -> None:
    """Poll ``done()`` while ``proc`` runs (its stderr if it dies; ``what`` if time runs out)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)


def _wait_for_epoch(proc, ckpt: Path, epoch: int, timeout: float = 300) -> None:
    """Until ``ckpt`` holds the end of ``epoch`` (atomic writes: it is never half-written)."""
    _wait_until(proc, lambda: _epoch_of(ckpt) >= epoch, f"checkpoint of epoch {epoch}", timeout)


def _held_at(step: int, ready: Path) -> list[str]:
    """Overrides that hold a job after global step ``step`` until a stop signal comes; the
    file ``ready`` says it got there."""
    return [
        "+callbacks.wait._target_=tests.faultinject.AwaitSignalAt",
        f"+callbacks.wait.at_step={step}",
        f"+callbacks.wait.ready={ready}",
    ]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _resume_then_finish(args: list[str], last: Path, whole, tmp_path: Path, env: dict):
    """Resume the stopped job from ``last`` into ``resumed/``; wait for the uninterrupted one."""
    resumed = run_cli(
        "train.py",
        [*args, f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'resumed'}"],
        tmp_path,
        env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    return resumed


def _whole_and_resumed_runs(uri: str, tmp_path: Path):
    """The uninterrupted job's run and the stopped-then-resumed job's (one run)."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert len(runs) == 2, "the resumed job must continue the stopped job's run"
    by_dir = {r.data.params["paths.output_dir"]: r for r in runs}
    return client, by_dir[str(tmp_path / "whole")], by_dir[str(tmp_path / "first")]


@pytest.mark.faults
def test_kill_9_then_resume_equals_the_uninterrupted_run(sqlite_uri, tmp_path, data_dir):
    """kill -9 mid-epoch 3 (of 0-3), after epoch 2's checkpoint; resume from last.ckpt into a
    new output dir: the same mlflow run, one point per epoch, val/test metrics bit-equal to
    the uninterrupted run, and the best checkpoint and best score from before the kill kept
    (the resumed job used to forget them and test a worse model)."""
    uri = sqlite_uri
    env = {"MLFLOW_TRACKING_URI": uri}
    whole = start_cli(
        "train.py", [*RESUMABLE, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path, env
    )
    ready = tmp_path / "at-step-35"
    first_args = [*RESUMABLE, *_held_at(35, ready), f"hydra.run.dir={tmp_path / 'first'}"]
    first = start_cli("train.py", first_args, tmp_path, env)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    _wait_until(first, ready.exists, ready.name)  # held mid-epoch 3, after epoch 2's checkpoint
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    killed_at = _epoch_of(last)
    _resume_then_finish(RESUMABLE, last, whole, tmp_path, env)

    client, a, b = _whole_and_resumed_runs(uri, tmp_path)
    assert b.info.status == "FINISHED"
    # what would tell a lost write from a numeric difference, if the histories ever differ:
    # writes the killed job queued (a sqlite lock wait past mlflow's timeout) and never sent
    from zoo.tracking.queue import DeliveryQueue

    queue = DeliveryQueue(tmp_path / "first" / "tracking-queue", uri)
    assert not queue.pending, f"the killed job left {queue.pending} writes undelivered"
    for key in ("val/f1_macro", "val/acc", "val/loss", "val/f1_macro_best", "train/loss"):
        ha, hb = _history(client, a.info.run_id, key), _history(client, b.info.run_id, key)
        assert len(ha) == len(hb) == 4 and len({s for s, _ in hb}) == 4, (key, ha, hb)
        assert hb == ha, f"{key} differs after a kill at epoch {killed_at}: {hb} vs {ha}"
    for key in ("test/acc", "test/f1_macro", "test/loss"):
        assert b.data.metrics[key] == a.data.metrics[key], key
    best_a = Path(a.data.tags["zoo.best_checkpoint"]).name
    # the case that used to fail: the best epoch came before the kill, later ones are worse
    assert int(best_a.removeprefix("best-epoch").removesuffix(".ckpt")) <= killed_at < 3
    assert b.data.tags["zoo.best_checkpoint"].endswith(best_a)
    assert (tmp_path / "resumed" / "checkpoints" / best_a).is_file()


def _trainer_with_checkpoint_callback(dirpath: Path, fn: str):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.states import TrainerFn

    cb = ModelCheckpoint(dirpath=dirpath, monitor="val/loss")
    state = SimpleNamespace(fn=TrainerFn(fn))
    return cb, SimpleNamespace(checkpoint_callbacks=[cb], is_global_zero=True, state=state)


@pytest.mark.parametrize("fn", ["fit", "test", "validate", "predict"])
def test_only_a_resumed_fit_carries_checkpoints(tmp_path, fn):
    """A resumed fit copies the earlier best checkpoint (here a distributed checkpoint's folder)
    into its own folder. Restoring that carried checkpoint for ``trainer.test`` calls the hook
    again with state that still names the first job's folder: nothing is touched then, so the
    folder other ranks are reading is never deleted and copied under them."""
    old, new = tmp_path / "first" / "checkpoints", tmp_path / "resumed" / "checkpoints"
    (old / "best-epoch000.ckpt").mkdir(parents=True)
    (old / "best-epoch000.ckpt" / "meta.pt").write_bytes(b"old shard")
    (new / "best-epoch000.ckpt").mkdir(parents=True)
    (new / "best-epoch000.ckpt" / "meta.pt").write_bytes(b"carried shard")
    before = (new / "best-epoch000.ckpt").stat().st_ino
    cb, trainer = _trainer_with_checkpoint_callback(new, fn)
    best = str(old / "best-epoch000.ckpt")
    state = {"dirpath": str(old), "best_model_path": best, "best_k_models": {best: 0.5}}
    checkpoint = {"callbacks": {cb.state_key: dict(state)}}

    faults.CarryCheckpoints(old / "last.ckpt").on_load_checkpoint(trainer, None, checkpoint)

    saved = checkpoint["callbacks"][cb.state_key]
    if fn == "fit":
        assert saved["dirpath"] == str(new)
        assert saved["best_model_path"] == str(new / "best-epoch000.ckpt")
        assert (new / "best-epoch000.ckpt" / "meta.pt").read_bytes() == b"old shard"
    else:
        assert saved == state
        assert (new / "best-epoch000.ckpt").stat().st_ino == before
        assert (new / "best-epoch000.ckpt" / "meta.pt").read_bytes() == b"carried shard"


# --------------------------------------------------------------------------- checkpoints

SAVE_SLOWLY = """
import sys, torch
from tests import faultinject
from zoo import faults
faults.torch.save = faultinject.slow_torch_save  # the write takes ~5 s
faults.AtomicCheckpointIO().save_checkpoint({"w": torch.full((200_000,), 2.0)}, sys.argv[1])
"""


@pytest.mark.faults
def test_a_kill_during_a_checkpoint_write_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    faults.AtomicCheckpointIO().save_checkpoint({"w": torch.ones(200_000)}, path)
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # umask applies, not mkstemp's 0600
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_SLOWLY, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    old = torch.load(path, weights_only=True)
    assert torch.equal(old["w"], torch.ones(200_000))  # intact: the new bytes went elsewhere
    assert len(list(tmp_path.glob(".last.ckpt.*.tmp"))) == 1  # the killed writer's
    # the next save replaces it, and clears what the killed writer left
    faults.AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_corrupt_checkpoint_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "last.ckpt"
    faults.atomic_torch_save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:-200])  # torn by a non-atomic writer
    with pytest.raises(ConfigError, match=f"ckpt_path={path}: not a loadable checkpoint"):
        read_checkpoint(path)


# --------------------------------------------------------------------------- signals


def _run_of(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


@pytest.mark.faults
def test_ctrl_c_saves_last_ckpt_and_marks_the_run_killed(sqlite_uri, tmp_path, data_dir):
    uri = sqlite_uri
    out = tmp_path / "out"
    ready = tmp_path / "at-step-15"
    # the signal lands after step 15, the 5th batch of epoch 1 (a signal sent right after the
    # epoch-0 checkpoint could land at the epoch boundary, and prove nothing about mid-epoch)
    proc = start_cli(
        "train.py",
        [*RESUMABLE, "trainer.max_epochs=50", *_held_at(15, ready), f"hydra.run.dir={out}"],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri},
    )
    last = out / "checkpoints" / "last.ckpt"
    _wait_until(proc, ready.exists, ready.name)  # held: nothing saves until the signal
    saved_at = last.stat().st_mtime_ns  # epoch 0's
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert last.stat().st_mtime_ns > saved_at  # saved again, at the interruption
    state = torch.load(last, map_location="cpu", weights_only=True)
    # mid-epoch, at the step the signal stopped: no work lost
    assert (state["epoch"], state["global_step"]) == (1, 15), err[-3000:]
    _, run = _run_of(uri)
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.faults
def test_stopped_mid_epoch_and_resumed_equals_the_uninterrupted_run(
    sqlite_uri, tmp_path, data_dir, workers
):
    """SIGTERM lands after step 15, the 5th batch of epoch 1, with or without workers: the
    resumed job trains the rest of epoch 1 on exactly the batches the uninterrupted job did
    (the loader's place is in last.ckpt), so every metric is bit-equal."""
    uri = sqlite_uri
    env = {"MLFLOW_TRACKING_URI": uri}
    args = [*RESUMABLE, f"data.num_workers={workers}", "trainer.max_epochs=3"]
    whole = start_cli("train.py", [*args, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path, env)
    ready = tmp_path / "at-step-15"
    first = start_cli(
        "train.py",
        [*args, *_held_at(15, ready), f"hydra.run.dir={tmp_path / 'first'}"],
        tmp_path,
        env,
    )
    _wait_until(first, ready.exists, ready.name)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (1, 15), err[-3000:]
    (loader,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    main = loader["_snapshot"]["_main_snapshot"] if workers else loader
    assert main["_sampler_iter_state"]["batches"] >= 5  # the loader's place in epoch 1
    resumed = _resume_then_finish(args, last, whole, tmp_path, env)
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a plain DataLoader
    client, a, b = _whole_and_resumed_runs(uri, tmp_path)
    for key in ("train/loss", "val/loss", "val/acc", "val/f1_macro"):
        ha, hb = _history(client, a.info.run_id, key), _history(client, b.info.run_id, key)
        assert len(ha) == 3 and hb == ha, f"{key}: {hb} vs {ha}"
    for key in ("test/acc", "test/f1_macro", "test/loss"):
        assert b.data.metrics[key] == a.data.metrics[key], key


@pytest.mark.faults
def test_slurm_requeue_continues_the_same_run(sqlite_uri, tmp_path, data_dir):
    """SLURM preemption through Lightning's SLURM environment: SIGUSR1 saves an HPC checkpoint
    and requeues the job (`scontrol requeue`); SLURM then sends SIGTERM (last.ckpt saved, exit
    143). The requeued job (same SLURM_JOB_ID: the same output dir) resumes from the newer
    checkpoint and finishes the same mlflow run."""
    uri = sqlite_uri
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeues = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {requeues}\n')
    scontrol.chmod(0o755)
    slurm = {
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "zoo-train",
        "SLURM_NTASKS": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    args = [*RESUMABLE, "trainer.max_epochs=3"]
    out = tmp_path / "logs" / "train" / "runs" / "slurm-4242"  # pinned by the job id
    ready = tmp_path / "at-step-15"
    proc = start_cli("train.py", [*args, *_held_at(15, ready)], tmp_path, slurm)
    _wait_until(proc, ready.exists, ready.name)  # held mid-epoch 1 until SIGTERM
    proc.send_signal(signal.SIGUSR1)
    _wait_until(proc, requeues.exists, "scontrol requeue", timeout=60)
    assert requeues.read_text().split() == ["requeue", "4242"]
    assert list(out.glob("hpc_ckpt_*.ckpt"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    _, run = _run_of(uri)
    assert run.info.status == "KILLED"
    last = out / "checkpoints" / "last.ckpt"  # saved on SIGTERM, after the HPC checkpoint
    assert last.stat().st_mtime_ns > max(p.stat().st_mtime_ns for p in out.glob("hpc_ckpt_*"))

    requeued = {**slurm, "SLURM_RESTART_COUNT": "1"}  # what SLURM sets on a requeued job
    again = run_cli("train.py", args, tmp_path, requeued)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"SLURM job 4242: resuming from {last}" in again.stdout + again.stderr
    client, run = _run_of(uri)
    assert run.info.status == "FINISHED"
    assert len(_history(client, run.info.run_id, "val/loss")) == 3


# --------------------------------------------------------------------------- non-finite loss


@pytest.mark.faults
def test_a_nan_loss_stops_the_job_and_keeps_the_last_good_checkpoint(
    sqlite_uri, tmp_path, data_dir
):
    uri = sqlite_uri
    out = tmp_path / "out"
    proc = run_cli(
        "train.py",
        [
            *RESUMABLE,
            f"hydra.run.dir={out}",
            "+callbacks.nan._target_=tests.faultinject.NaNBatch",
            "+callbacks.nan.at_step=13",  # epoch 1 (10 batches per epoch), batch 3
        ],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "loss became nan at epoch 1, step 14 (batch 3 of the epoch)" in proc.stderr
    assert "Traceback" not in proc.stderr
    client, run = _run_of(uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["zoo.failure"].startswith("non-finite loss: loss = nan at epoch 1")
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for path in ckpts:  # only the good epoch 0 was saved, and it is finite
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["epoch"] == 0
        assert all(
            torch.isfinite(v).all()
            for v in state["state_dict"].values()
            if torch.is_tensor(v) and v.is_floating_point()
        )
    assert len(_history(client, run.info.run_id, "val/loss")) == 1


# --------------------------------------------------------------------------- server outages


@pytest.mark.waits
@pytest.mark.faults
def test_a_60_s_tracking_server_outage_loses_nothing(tmp_path, data_dir):
    """A real mlflow server is killed (SIGKILL) after epoch 2 of two jobs and restarted 60 s
    later on the same store. The long job outlives the outage (it trains epochs 3-5 during it,
    then holds until the server is back): its queue is delivered while it trains on. The short
    one ends during the outage: it exits 3 with the command that delivers its queue (its mlflow
    Model included), which is then run. Both runs end FINISHED with every epoch's metrics and
    their checkpoint artifacts."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    env = {"MLFLOW_TRACKING_URI": uri}
    back = tmp_path / "server-is-back"
    slow = "+callbacks.slow._target_=tests.faultinject.SlowEpochs"
    long_args = [*RESUMABLE, "trainer.max_epochs=6", slow, "+callbacks.slow.seconds=3"]
    long_args += ["+callbacks.hold._target_=tests.faultinject.HoldEpoch"]
    long_args += ["+callbacks.hold.at_epoch=4", f"+callbacks.hold.until={back}"]
    short_args = [*RESUMABLE, slow, "+callbacks.slow.seconds=6", "tracking.outage_wait=0"]
    short_args += ["tracking.log_model=true"]
    long = start_cli("train.py", [*long_args, f"hydra.run.dir={tmp_path / 'long'}"], tmp_path, env)
    short = start_cli(
        "train.py", [*short_args, f"hydra.run.dir={tmp_path / 'short'}"], tmp_path, env
    )
    try:
        # the session's first test: its jobs may build the kernels and the demo data first
        _wait_for_epoch(long, tmp_path / "long" / "checkpoints" / "last.ckpt", 1, timeout=600)
        assert short.poll() is None, "the short job must still be training when the server dies"
        stop_mlflow_server(server, signal.SIGKILL)
        down_at = time.monotonic()

        _, short_err = short.communicate(timeout=300)  # ends while the server is down
        assert short.returncode == 3, short_err[-3000:]
        assert f"python -m zoo.tracking.delivery {tmp_path / 'short'}" in short_err
        assert long.poll() is None, "the long job must outlive the outage"

        time.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
        server = start_mlflow_server(tmp_path, port)
        back.touch()  # the long job trains on: its next writes find the server again
        delivered = subprocess.run(  # the short job's queue, while the long job trains on
            [sys.executable, "-m", "zoo.tracking.delivery", str(tmp_path / "short")],
            cwd=tmp_path,
            env=cli_env(env),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert delivered.returncode == 0, delivered.stderr[-3000:]
        long_out, long_err = long.communicate(timeout=600)
        assert long.returncode == 0, long_err[-3000:]
        assert "answers again: delivered" in long_out + long_err

        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
        by_dir = {Path(r.data.params["paths.output_dir"]).name: r for r in runs}
        assert sorted(by_dir) == ["long", "short"]
        for name, epochs in (("long", 6), ("short", 4)):
            run = by_dir[name]
            assert run.info.status == "FINISHED", name
            for key in ("val/loss", "val/f1_macro", "train/loss"):
                steps = [s for s, _ in _history(client, run.info.run_id, key)]
                assert len(steps) == epochs == len(set(steps)), (name, key, steps)
            assert "test/f1_macro" in run.data.metrics
            files = artifacts(client, run.info.run_id)
            assert f"{run.data.tags['zoo.best_checkpoint']}" in files, (name, files)
            assert "config/config.yaml" in files
        assert by_dir["short"].data.tags["zoo.model_uri"].startswith("models:/")
        assert not (tmp_path / "short" / "tracking-queue" / "failed.jsonl").exists()
    finally:
        for proc in (long, short):
            if proc.poll() is None:
                proc.kill()
        stop_mlflow_server(server)


def test_what_counts_as_an_outage():
    import requests
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from zoo.tracking.queue import is_outage

    def wrapped(inner: BaseException) -> MlflowException:  # as mlflow's http_request raises
        try:
            raise inner
        except BaseException:
            try:
                raise MlflowException("API request to http://x failed with exception ...")
            except MlflowException as exc:
                return exc

    assert is_outage(wrapped(requests.ConnectionError("Connection refused")))
    assert is_outage(wrapped(requests.exceptions.RetryError("too many 503 error responses")))
    assert is_outage(requests.ReadTimeout("read timed out"))
    assert is_outage(RestException({"error_code": "INTERNAL_ERROR", "message": "db down"}))
    # a request the server understood and refused is not an outage: it must not be queued
    assert not is_outage(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "x"}))
    # what mlflow's SQL stores raise for "database is locked"
    assert is_outage(MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_outage(MlflowException("Changing param values is not allowed"))
    assert not is_outage(ValueError("bug"))


def test_queued_calls_survive_the_journal(tmp_path):
    """What a queued write keeps: mlflow entities and plain values, and a copy of an artifact
    as it was when logged."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

    from zoo.tracking.queue import OPS, DeliveryQueue, _decode

    artifact = tmp_path / "last.ckpt"
    artifact.write_text("epoch 1")
    queue = DeliveryQueue(tmp_path / "queue", "http://127.0.0.1:1")
    metrics, params = [Metric("val/loss", 0.5, 1700000000000, 9)], [Param("seed", "7")]
    dataset = Dataset("train", "abc", "local", '{"uri": "x"}', profile='{"num_samples": 3}')
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])]
    queue.append("log_batch", {"run_id": "r", "metrics": metrics, "params": params})
    queue.append("log_inputs", {"run_id": "r", "datasets": inputs})
    queue.append("log_artifact", {"run_id": "r", "local_path": str(artifact)})
    artifact.write_text("epoch 2")  # overwritten after it was queued
    queue.close()

    ops = [json.loads(line) for line in (tmp_path / "queue" / OPS).read_text().splitlines()]
    assert [op["method"] for op in ops] == ["log_batch", "log_inputs", "log_artifact"]
    batch = _decode(ops[0]["kwargs"])
    assert (batch["metrics"][0].key, batch["metrics"][0].value, batch["metrics"][0].step) == (
        "val/loss",
        0.5,
        9,
    )
    assert batch["metrics"][0].timestamp == 1700000000000 and batch["params"][0].value == "7"
    ds = _decode(ops[1]["kwargs"])["datasets"][0]
    assert (ds.dataset.digest, ds.tags[0].value) == ("abc", "train")
    assert Path(ops[2]["kwargs"]["local_path"]).read_text() == "epoch 1"
    assert DeliveryQueue(tmp_path / "queue", "x").pending == 3  # a new process sees them


def test_a_resume_delivers_what_the_killed_job_left_queued(sqlite_uri, tmp_path):
    """A job killed with writes still queued (an outage, or a sqlite lock wait past mlflow's
    timeout) and resumed into a new output dir: the resume delivers them into the run first,
    leaves the run for the resumed job (not FAILED), and a second resume finds nothing left."""
    from mlflow.entities import Metric

    from zoo.tracking.delivery import deliver_before_resume
    from zoo.tracking.queue import DeliveryQueue

    uri = sqlite_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("zoo")).info.run_id
    first = tmp_path / "first"
    (first / "checkpoints").mkdir(parents=True)
    last = first / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    queue = DeliveryQueue(first / "tracking-queue", uri)
    metrics = [Metric("val/f1_macro", v, 1700000000000, s) for s, v in ((19, 0.25), (29, 0.5))]
    queue.append("log_batch", {"run_id": run_id, "metrics": metrics})
    queue.close()  # killed: its lock goes with it

    assert deliver_before_resume(last, first) == 0  # resumed in place: its own queue, its job
    assert deliver_before_resume(last, tmp_path / "resumed") == 1
    assert _history(client, run_id, "val/f1_macro") == [(19, 0.25), (29, 0.5)]
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and "zoo.failure" not in run.data.tags
    assert deliver_before_resume(last, tmp_path / "resumed-again") == 0


@pytest.mark.e2e
@pytest.mark.parametrize("module", ["zoo.tracking.delivery", "zoo.delivery"])
def test_delivery_of_a_folder_without_a_queue_is_a_clear_error(tmp_path, module):
    """Both the command and the one earlier jobs' messages print (zoo.delivery)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path}: no tracking queue here" in proc.stderr


def test_a_resumed_job_does_not_log_the_killed_jobs_last_points_twice(sqlite_uri, tmp_path):
    """The killed job logged step 29's metrics but died before its checkpoint (step 19) was
    written: the resumed job trains steps 20-29 again and logs 29 and 39; step 29 stays one
    point (the first)."""
    from zoo.tracking.lightning import ZooMLFlowLogger

    uri = sqlite_uri
    killed = ZooMLFlowLogger(experiment_name="zoo", tracking_uri=uri)
    for step, value in ((9, 0.1), (19, 0.2), (29, 0.3)):
        killed.log_metrics({"val/loss": value, "val/acc": 1 - value}, step=step)
    resumed = ZooMLFlowLogger(experiment_name="zoo", tracking_uri=uri, run_id=killed.run_id)
    resumed.resume_after(19)
    resumed.log_metrics({"val/loss": 0.31, "val/acc": 0.69, "lr": 0.01}, step=29)
    resumed.log_metrics({"val/loss": 0.4, "val/acc": 0.6}, step=39)
    client = MlflowClient(uri)
    assert _history(client, killed.run_id, "val/loss") == [
        (9, 0.1),
        (19, 0.2),
        (29, 0.3),
        (39, 0.4),
    ]
    assert len(_history(client, killed.run_id, "val/acc")) == 4
    assert _history(client, killed.run_id, "lr") == [(29, 0.01)]  # new at step 29: logged
