"""Tensor parallelism (and FSDP2) on real gloo processes: SparseBERT split across ranks equals
the one-process model; trainer=model_parallel trains, resumes from its distributed checkpoint,
fine-tunes, and its checkpoint evaluates in one process with the same metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, artifacts, cli_env, failure_text, run_cli


@pytest.mark.parametrize(("dp", "tp"), [(1, 2), (2, 1), (2, 2)], ids=["tp2", "fsdp2", "dp2xtp2"])
@pytest.mark.multiprocess
def test_split_model_equals_one_process(tmp_path, dp, tp):
    """Loss and every parameter's gradient on a fixed batch, for dense, DAM_s, DAM_u (a Gumbel
    sample, same noise) and random masks; fsdp2 is FSDP2 alone over two data-parallel ranks (each
    a half of the batch), dp2xtp2 both."""
    out = tmp_path / "parity.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={dp * tp}",
            "--standalone",
            str(ROOT / "tests" / "tp_parity.py"),
            str(out),
            str(dp),
            str(tp),
        ],
        env=cli_env({"OMP_NUM_THREADS": "1"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert sorted(results) == ["dam_s", "dam_u", "dense", "random"]
    for mode, r in results.items():
        assert r["loss_diff"] <= 1e-5, (mode, r)
        assert r["max_grad_diff"] <= 1e-5, (mode, r)
        assert r["grads"] == (42 if mode.startswith("dam") else 41), (mode, r)
        assert r["grad_norm"] > 1e-3  # gradients that say something
        # each rank really holds its heads' rows of Q (and its rows of the embedding table),
        # split again by FSDP2 across the data-parallel ranks
        assert r["local_query_rows"] == 32 // tp // dp and r["local_vocab_rows"] == 96 // tp // dp
        if mode.startswith("dam"):
            assert r["local_alpha_heads"] == 4 // tp and r["alpha_grad_norm"] > 0


def _train(tmp_path, uri, *overrides):
    return run_cli(
        "train.py",
        [
            "trainer=model_parallel",
            "trainer.accelerator=cpu",
            "debug=fast",
            "data.subset=null",  # two whole test batches, not one window
            *overrides,
        ],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
        timeout=600,
    )


@pytest.mark.multiprocess
def test_model_parallel_search_resume_finetune_evaluate(sqlite_uri, tmp_path, data_dir):
    uri = sqlite_uri
    client = MlflowClient(uri)
    search = _train(tmp_path, uri, "experiment=sparsebert_dam_search_demo")
    assert search.returncode == 0, failure_text(search)
    (run,) = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.strategy.tensor_parallel_size"] == "2"
    out_dir = Path(run.data.params["paths.output_dir"])
    last = out_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # one shard per rank
    assert "masks/attention_mask.pt" in artifacts(client, run.info.run_id)

    # resumed from the distributed checkpoint under the same layout: the same run goes on
    resumed = _train(
        tmp_path,
        uri,
        "experiment=sparsebert_dam_search_demo",
        f"ckpt_path={last}",
        "trainer.max_epochs=2",
    )
    assert resumed.returncode == 0, failure_text(resumed)
    assert "not carried forward" not in resumed.stdout + resumed.stderr  # best/last folders
    (run,) = client.search_runs([client.get_experiment_by_name("zoo").experiment_id])
    assert run.info.status == "FINISHED"
    epochs = client.get_metric_history(run.info.run_id, "val/mask_density")
    assert sorted(m.step for m in epochs) == sorted({m.step for m in epochs}) and len(epochs) == 2

    # stage 2 from the search's mask, split the same way; then evaluated in one process
    finetune = _train(
        tmp_path,
        uri,
        "experiment=sparsebert_finetune_demo",
        f"model.mask.from_run={run.info.run_id}",
    )
    assert finetune.returncode == 0, failure_text(finetune)
    runs = client.search_runs(
        [client.get_experiment_by_name("zoo").experiment_id],
        f"params.`model.mask.from_run` = '{run.info.run_id}'",
    )
    (tuned,) = runs
    assert tuned.info.status == "FINISHED"
    assert tuned.data.metrics["val/mask_density"] == pytest.approx(
        run.data.metrics["val/mask_density"]
    )
    report = tmp_path / "report"
    proc = run_cli(
        "evaluate.py",
        [f"run_id={tuned.info.run_id}", f"output_dir={report}"],
        tmp_path,
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((report / "metrics.json").read_text())
    for key in ("test/acc", "test/f1_macro"):
        assert single[key] == pytest.approx(tuned.data.metrics[key], abs=1e-6), key
    assert single["test/loss"] == pytest.approx(tuned.data.metrics["test/loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [
                "experiment=sparsebert_dense_demo",
                "trainer.devices=3",
                "trainer.strategy.tensor_parallel_size=3",
            ],
            "num_attention_heads=4 is not divisible by trainer.strategy.tensor_parallel_size=3",
        ),
        (
            ["experiment=sparsebert_dense_demo", "trainer.strategy.data_parallel_size=2"],
            "trainer.strategy.tensor_parallel_size=2 × trainer.strategy.data_parallel_size=2 = 4",
        ),
        (["experiment=eeg_cnn_lstm"], "has no tensor-parallel plan"),
    ],
    ids=["heads", "world-size", "no-plan"],
)
@pytest.mark.e2e
def test_bad_model_parallel_settings_are_one_paragraph(
    sqlite_uri, tmp_path, data_dir, overrides, expected
):
    proc = run_cli(
        "train.py",
        ["trainer=model_parallel", "trainer.accelerator=cpu", "debug=fast", *overrides],
        tmp_path,
        {"MLFLOW_TRACKING_URI": sqlite_uri},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # a user error
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_layout_check_counts_processes_like_the_launcher(monkeypatch):
    from omegaconf import OmegaConf

    from zoo.errors import ConfigError
    from zoo.parallel import check_layout, world_size_of

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def trainer(**kw):
        strategy = {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"}
        strategy.update(kw.pop("strategy", {}))
        return OmegaConf.create({"devices": 2, "num_nodes": 1, "strategy": strategy, **kw})

    assert world_size_of(trainer()) == 2
    assert world_size_of(trainer(devices=[0, 1, 2], num_nodes=2)) == 6
    assert world_size_of(trainer(devices="0,1")) == 2
    assert world_size_of(trainer(devices="auto")) is None  # unknown: left to Lightning
    check_layout(
        trainer(strategy={"tensor_parallel_size": 2, "data_parallel_size": 2}, num_nodes=2)
    )
    with pytest.raises(ConfigError, match=r"= 4 processes, but the job has 2"):
        check_layout(trainer(strategy={"tensor_parallel_size": 2, "data_parallel_size": 2}))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=0: expected a positive"):
        check_layout(trainer(strategy={"tensor_parallel_size": 0, "data_parallel_size": 1}))
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's count wins
    check_layout(trainer(strategy={"tensor_parallel_size": 2, "data_parallel_size": 2}))
    # other strategies are not this check's business
    check_layout(OmegaConf.create({"devices": 3, "strategy": "ddp"}))
