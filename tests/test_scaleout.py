"""Scale-out on existing engines, with real processes: Hydra's joblib and submitit launchers, one
Optuna study worked by two processes, a team mlflow server on PostgreSQL with basic-auth, and
two torchrun agents training one DDP job as two "nodes" on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import requests
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from hydra_plugins.zoo_optuna_sweeper import _impl as sweeper
from tests.conftest import (
    CONF,
    ROOT,
    cli_env,
    free_port,
    run_cli,
    start_cli,
    start_mlflow_server,
    stop_mlflow_server,
)
from zoo.cluster import check_allocation
from zoo.errors import ConfigError


def _runs(uri: str, experiment: str = "zoo"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


# --------------------------------------------------------------------------- launchers


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
@pytest.mark.e2e
def test_a_multirun_through_a_launcher_is_one_run_per_job(launcher, sqlite_uri, tmp_path, data_dir):
    uri = sqlite_uri
    proc = run_cli(
        "train.py",
        [
            "-m",
            f"hydra/launcher={launcher}",
            "experiment=eeg_cnn_lstm,eeg_cnn_gru",
            "debug=fast",
            "tracking.log_model=false",  # not what this test is about: saves seconds per job
        ],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = _runs(uri)
    assert sorted(r.data.tags["zoo.experiment"] for r in runs) == ["eeg_cnn_gru", "eeg_cnn_lstm"]
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in runs)
    dirs = {r.data.params["paths.output_dir"] for r in runs}
    assert len(dirs) == 2 and all(Path(d, "checkpoints").is_dir() for d in dirs)
    if launcher == "submitit_local":  # really went through submitit: its job folders exist
        assert list(tmp_path.rglob(".submitit/*/*_submitted.pkl"))


@pytest.mark.e2e
def test_launcher_options_are_checked(tmp_path):
    proc = run_cli("train.py", ["-m", "hydra/launcher=joblib", "hydra.launcher.n_job=2"], tmp_path)
    assert proc.returncode == 2
    assert "'n_job' is not an option of hydra/launcher=joblib" in proc.stderr
    assert "n_jobs" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train.py", ["-m", "hydra/launcher=slurm"], tmp_path)
    assert proc.returncode == 2 and "submitit_slurm" in proc.stderr


def test_slurm_launcher_follows_the_trainer():
    """tasks per node = trainer.devices, nodes = trainer.num_nodes (Lightning's SLURM rule)."""
    overrides = ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", [*overrides, "trainer.num_nodes=2"], return_hydra_config=True)
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
        tasks, nodes = cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.nodes
    GlobalHydra.instance().clear()
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (tasks, nodes) == (4, 2)


# --------------------------------------------------------------------------- optuna


def test_search_space_from_hydra_sweeps():
    space, fixed = sweeper.search_space(
        OmegaConf.create({"a": "choice(1, 2)", "b": "tag(log, interval(0.001, 0.1))"}),
        ["c=range(2, 10, 2)", "d=tag(int, interval(1, 5))", "e=0.5", "a=choice(x, y)"],
    )
    assert space["a"] == optuna.distributions.CategoricalDistribution(["x", "y"])  # CLI wins
    assert space["b"] == optuna.distributions.FloatDistribution(0.001, 0.1, log=True)
    assert space["c"] == optuna.distributions.IntDistribution(2, 8, step=2)  # stop excluded
    assert space["d"] == optuna.distributions.IntDistribution(1, 5)
    assert fixed == ["e=0.5"]
    with pytest.raises(sweeper.SweepError, match="b=interval"):
        sweeper.search_space(OmegaConf.create({"b": "interval(1.0, 0.5)"}), [])


@pytest.mark.multiprocess
def test_two_workers_share_one_study(sqlite_uri, tmp_path, data_dir):
    """Two processes, one sqlite study, 2 trials each: 4 distinct trials, 4 mlflow runs."""
    uri = sqlite_uri
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        "hparams_search=eeg_optuna",
        "debug=fast",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=shared",
        "tracking.log_model=false",
    ]
    workers = [start_cli("train.py", args, tmp_path, {"MLFLOW_TRACKING_URI": uri}) for _ in "ab"]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, (out + err)[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no repeated trial
    runs = _runs(uri)
    tags = sorted(
        (r.data.tags["zoo.tag.optuna_study"], int(r.data.tags["zoo.tag.optuna_trial"]))
        for r in runs
    )
    assert tags == [("shared", n) for n in range(4)]
    assert {r.data.tags["zoo.tag.optuna_worker"] for r in runs} == {"0", "1"}
    for run in runs:  # the run trained with its trial's parameters
        trial = trials[int(run.data.tags["zoo.tag.optuna_trial"])]
        assert float(run.data.params["model.optimizer.lr"]) == trial.params["model.optimizer.lr"]
        assert trial.value == pytest.approx(run.data.metrics["val/f1_macro_best"])
    results = OmegaConf.load(
        tmp_path / "logs" / "train" / "optuna" / "shared" / "optimization_results.yaml"
    )
    assert results.study_trials.complete == 4 and results.best_value == study.best_value
    seeds = sorted(  # each worker seeded its sampler with seed + its worker id
        line.split("(seed ")[1].split(")")[0]
        for out, _ in outputs
        for line in out.splitlines()
        if "Optuna study 'shared'" in line
    )
    assert seeds == ["1234", "1235"]
    assert (tmp_path / "logs" / "train" / "optuna" / "shared" / "trial-3").is_dir()


@pytest.mark.parametrize(
    "storage, expected",
    [
        ("sqlite:////no/such/folder/optuna.db", "cannot open it"),
        ("postgresql://zoo:pw@127.0.0.1:{port}/optuna", "cannot open it"),
        ("not a url", "not a database URL"),
    ],
)
@pytest.mark.e2e
def test_a_storage_that_cannot_be_opened_is_one_paragraph(tmp_path, storage, expected):
    storage = storage.format(port=free_port())
    proc = run_cli(
        "train.py",
        ["hparams_search=eeg_optuna", f"hydra.sweeper.storage='{storage}'", "debug=fast"],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sweep error: hydra.sweeper.storage=" in proc.stderr and expected in proc.stderr
    assert "Traceback" not in proc.stderr and "pw@" not in proc.stderr  # password not shown


@pytest.mark.e2e
def test_an_unreachable_postgresql_store_is_one_paragraph(tmp_path):
    uri = f"postgresql://zoo:secret@127.0.0.1:{free_port()}/mlflow"
    proc = run_cli("train.py", ["debug=fast"], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tracking store postgresql://zoo:***@127.0.0.1" in proc.stderr
    assert "Connection refused" in proc.stderr or "connection" in proc.stderr.lower()
    assert "secret" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_a_failing_trial_is_recorded_and_stops_the_sweep_with_a_message(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = run_cli(
        "train.py",
        [
            "hparams_search=eeg_optuna",
            "debug=fast",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.n_trials=3",
            "trainer.max_epochs=choice(abc)",
        ],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "1 of 1 trials failed, more than hydra.sweeper.max_failure_rate=0.0" in proc.stderr
    assert "bad value for 'trainer.max_epochs'" in proc.stderr
    (trial,) = optuna.load_study(study_name="eeg", storage=storage).get_trials()
    assert (
        trial.state == optuna.trial.TrialState.FAIL and "max_epochs" in trial.user_attrs["failure"]
    )
    assert (tmp_path / "logs" / "train" / "optuna" / "eeg" / "optimization_results.yaml").is_file()


@pytest.mark.services
def test_workers_get_distinct_ids_from_a_postgresql_storage(postgres):
    url = postgres("optuna")
    storage = sweeper.open_storage(url, heartbeat=60, grace=None)
    ids = [sweeper.claim_worker_id(storage, "pg") for _ in range(3)]
    assert ids == [0, 1, 2]
    assert sweeper.redact(url).startswith("postgresql://zoo:***@127.0.0.1")


# --------------------------------------------------------------------------- team server


@pytest.mark.services
def test_team_server_on_postgresql_with_basic_auth(tmp_path, data_dir, postgres):
    """mlflow server: PostgreSQL backend store, artifact proxy, basic-auth. Requests without a
    login are refused (and the zoo says so in one paragraph); with one, a job logs everything."""
    backend = postgres("mlflow")
    auth_db = postgres("mlflow_auth")
    admin_pw = "admin-password-1234"
    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {auth_db}\nadmin_username = admin\nadmin_password = {admin_pw}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    started = time.monotonic()
    server = start_mlflow_server(
        tmp_path,
        port,
        backend=backend,
        extra_args=(
            "--app-name",
            "basic-auth",
            "--allowed-hosts",
            f"127.0.0.1:{port},localhost:{port}",
        ),
        env={
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "zoo-test-csrf-key",  # basic-auth's CSRF key
        },
    )
    print(f"\nmlflow server on PostgreSQL with basic-auth up in {time.monotonic() - started:.1f} s")
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
        assert refused.value.code == 401
        created = requests.post(
            f"{url}/api/2.0/mlflow/users/create",
            json={"username": "alice", "password": "alice-password-1234"},
            auth=("admin", admin_pw),
            timeout=30,
        )
        assert created.status_code == 200, created.text

        no_login = run_cli("train.py", ["debug=fast"], tmp_path, {"MLFLOW_TRACKING_URI": url})
        assert no_login.returncode == 2
        assert (
            "requires a login" in no_login.stderr and "MLFLOW_TRACKING_USERNAME" in no_login.stderr
        )
        assert "Traceback" not in no_login.stderr

        alice = {
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_TRACKING_USERNAME": "alice",
            "MLFLOW_TRACKING_PASSWORD": "alice-password-1234",
        }
        started = time.monotonic()
        args = ["debug=fast", "tracking.experiment_name=team", "tracking.log_model=false"]
        proc = run_cli("train.py", args, tmp_path, alice)
        print(f"debug=fast job through the server: {time.monotonic() - started:.1f} s")
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

        import os

        os.environ.update(alice)  # the client reads the login from the environment
        try:
            (run,) = _runs(url, "team")
            client = MlflowClient(url)
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.user"]
            assert run.data.params["trainer.max_epochs"] == "1" and "test/acc" in run.data.metrics
            ckpt = run.data.tags["zoo.best_checkpoint"]
            local = client.download_artifacts(run.info.run_id, ckpt, str(tmp_path / "dl"))
            assert Path(local).stat().st_size > 0
        finally:
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(key, None)
        # the artifact proxy stored it under --artifacts-destination, not on the client's disk
        stored = list((tmp_path / "server-artifacts").rglob(Path(ckpt).name))
        assert stored and stored[0].read_bytes() == Path(local).read_bytes()
    finally:
        stop_mlflow_server(server)


# --------------------------------------------------------------------------- multi-node DDP


@pytest.mark.multiprocess
def test_two_torchrun_agents_train_one_ddp_job(sqlite_uri, tmp_path, data_dir):
    """Two torchrun agents on loopback, one process each: a 2-node DDP job. One output dir, one
    FINISHED run (rank 0), and its DDP-gathered test metrics equal one process's evaluation of
    the same weights over the same test windows (2 ranks x 2 batches = the first 4 batches)."""
    uri = sqlite_uri
    port = free_port()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=zoo-two-nodes",
                str(ROOT / "train.py"),
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.num_nodes=2",
                "trainer.devices=1",
                "debug=fast",
                "tracking.log_model=false",
            ],
            cwd=tmp_path,
            env=cli_env({"MLFLOW_TRACKING_URI": uri}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in "".join(outputs)
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED" and run.data.params["trainer.num_nodes"] == "2"
    out_dir = Path(run.data.params["paths.output_dir"])
    assert out_dir.name == "torchrun-zoo-two-nodes"
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == [out_dir.name]

    proc = run_cli(
        "evaluate.py",
        [f"run_id={run.info.run_id}", "limit_test_batches=4", f"output_dir={tmp_path / 'rep'}"],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    for key in ("test/acc", "test/f1_macro"):
        assert single[key] == pytest.approx(run.data.metrics[key], abs=1e-6), key
    assert single["test/loss"] == pytest.approx(run.data.metrics["test/loss"], abs=1e-5)


def test_devices_and_nodes_must_match_the_launcher():
    trainer = OmegaConf.create({"devices": 2, "num_nodes": 1})
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}
    with pytest.raises(ConfigError, match=r"trainer.devices=2, but torchrun started 1"):
        check_allocation(trainer, torchrun)
    trainer = OmegaConf.create({"devices": 1, "num_nodes": 1})
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=1 .* set trainer.num_nodes=2"):
        check_allocation(trainer, torchrun)
    slurm = {"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "zoo", "SLURM_NTASKS_PER_NODE": "4"}
    with pytest.raises(ConfigError, match=r"--ntasks-per-node=1"):
        check_allocation(trainer, {**slurm, "SLURM_NNODES": "2"})
    trainer = OmegaConf.create({"devices": 4, "num_nodes": 1})
    with pytest.raises(ConfigError, match=r"SLURM job has 2 nodes"):
        check_allocation(trainer, {**slurm, "SLURM_NNODES": "2"})
    check_allocation(
        OmegaConf.create({"devices": 4, "num_nodes": 2}), {**slurm, "SLURM_NNODES": "2"}
    )
    check_allocation(trainer, {**slurm, "SLURM_JOB_NAME": "bash"})  # interactive: not managed
