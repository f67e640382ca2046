"""zoo.studies: the accuracy-vs-density study (sparse_attention), cross-validation (cv) and RLHF's
reward–KL frontier (rlhf_frontier), their jobs as real train.py multiruns, and their summaries
(tables, figures, a study run in mlflow)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import stats

from tests.conftest import artifacts, cli_env, run_cli
from zoo.studies import sparse_attention
from zoo.studies.sparse_attention import Row, groups, table


def test_groups_pool_seeds_per_method_and_lambda_or_density():
    rows = [
        Row("random", None, 0.30, 1, 0.60, 0.58, "r1"),
        Row("dense", None, 1.0, 0, 0.80, 0.79, "d0"),
        Row("dam_s", 0.1, 0.31, 0, 0.78, 0.77, "f0", "s1"),
        Row("random", None, 0.30, 0, 0.64, 0.62, "r0"),
        Row("dam_s", 0.1, 0.31, 1, 0.76, 0.75, "f1", "s1"),
        Row("dense", None, 1.0, 1, 0.82, 0.80, "d1"),
        Row("search:dam_s", 0.1, 0.31, 0, 0.70, 0.69, "s1"),
    ]
    gs = groups(rows)
    assert [g.method for g in gs] == ["dense", "dam_s", "random", "search:dam_s"]
    dense, learned, random_, _ = gs
    assert dense.seeds == [0, 1] and dense.mean == pytest.approx(0.81)
    assert dense.std == pytest.approx(0.0141421, abs=1e-6)  # sample sd over the seeds
    assert learned.accs == [0.78, 0.76] and learned.lam == 0.1
    assert random_.accs == [0.64, 0.60] and random_.density == pytest.approx(0.30)
    text = table(gs).splitlines()
    assert text[2].startswith("| dense |  | 100.0% |  | 0.8100 ± 0.0141 | 0.8000, 0.8200 |")
    assert text[3].startswith("| DAM_s | 0.1 | 31.0% |  | 0.7700 ± 0.0141 |")
    assert text[5].startswith("| DAM_s search | 0.1 | 31.0% |  | 0.7000 (one seed) | 0.7000 |")


def test_density_on_tokens_leaves_padding_out():
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[:, 0, :2, :2] = True  # head 0 keeps the first two tokens' pairs, head 1 nothing
    assert sparse_attention.token_density(mask, [2]) == pytest.approx(0.5)
    assert sparse_attention.token_density(mask, [4]) == pytest.approx(4 / 16 / 2)
    assert sparse_attention.token_density(mask, [2, 4]) == pytest.approx((0.5 + 0.125) / 2)
    full = torch.ones(3, 2, 4, 4, dtype=torch.bool)  # per-layer masks too
    assert sparse_attention.token_density(full, [1, 3, 4]) == pytest.approx(1.0)
    rows = [
        Row("random", None, 0.3, s, 0.6, 0.6, f"r{s}", None, t) for s, t in ((0, 0.2), (1, 0.4))
    ]
    (g,) = groups(rows)
    assert g.token_density == pytest.approx(0.3)
    assert table([g]).splitlines()[2].startswith("| random |  | 30.0% | 30.0% | 0.6000 ± 0.0000 |")


def test_a_stage_runs_only_the_jobs_without_a_finished_run(tmp_path, monkeypatch):
    """An interrupted study run again: finished jobs are skipped, a killed one is run again,
    per seed; ``--rerun`` runs them all."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("s")

    def run(stage, status, metrics=None, **params):
        r = client.create_run(
            exp,
            tags={
                "zoo.kind": "train",
                "zoo.tag.study": "st",
                "zoo.experiment": sparse_attention.EXPERIMENTS[stage],
            },
        )
        for k, v in params.items():
            client.log_param(r.info.run_id, k.replace("__", "."), v)
        for k, v in (metrics or {}).items():
            client.log_metric(r.info.run_id, k, v)
        client.set_terminated(r.info.run_id, status)
        return r.info.run_id

    run("dense", "FINISHED", seed=0, model__mask__mode="dense")
    run("dense", "KILLED", seed=1, model__mask__mode="dense")
    searches = [
        run(
            "search",
            "FINISHED",
            {"test/acc": 0.7, "val/mask_density": d},
            seed=0,
            model__mask__mode="dam_s",
            model__mask__lambda_sparsity=lam,
        )
        for lam, d in ((0.01, 0.9), (0.1, 0.5))
    ]
    run(
        "finetune", "FINISHED", seed=0, model__mask__mode="fixed", model__mask__from_run=searches[1]
    )
    run("finetune", "FAILED", seed=1, model__mask__mode="fixed", model__mask__from_run=searches[0])
    run("random", "FINISHED", seed=1, model__mask__mode="random", model__mask__density=0.5)

    calls = []
    monkeypatch.setattr(sparse_attention, "multirun", lambda o, *a: calls.append(o[3:]))
    argv = ["--study", "st", "--experiment", "s", "--seeds", "0", "1", "--modes", "dam_s"]
    argv += ["--lambdas", "0.01", "0.1", "1.0"]

    def stage(name, *extra):
        calls.clear()
        args = sparse_attention.parse([*argv, *extra])
        sparse_attention.run_stage(name, args, client, exp, {})
        return calls[:]

    assert stage("dense") == [["seed=1"]]
    assert stage("search") == [
        ["seed=0", "model.mask.mode=dam_s", "model.mask.lambda_sparsity=1.0"]
    ]
    assert stage("finetune") == [
        ["seed=0", f"model.mask.from_run={searches[0]}"],
        ["seed=1", f"model.mask.from_run={searches[1]},{searches[0]}"],
    ]
    assert stage("random") == [
        ["seed=0", "model.mask.density=0.5,0.9"],
        ["seed=1", "model.mask.density=0.9"],
    ]
    assert stage("dense", "--rerun") == [["seed=0,1"]]


def _study(tmp_path, uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zoo.studies.sparse_attention", *args],
        cwd=tmp_path,
        env=cli_env({"MLFLOW_TRACKING_URI": uri}),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.e2e
def test_the_study_runs_every_stage_and_summarises_them(sqlite_uri, tmp_path, data_dir):
    """Dense, a DAM_s search, the fine-tune from its mask and a random mask of its density,
    each a train.py multirun on pretrained MiniLM (debug=fast), then the summary run."""
    uri = sqlite_uri
    out = tmp_path / "summary"
    study = (
        *("--study", "tiny", "--seeds", "0", "--modes", "dam_s", "--lambdas", "100"),
        *("--out", str(out), "--", "debug=fast", "tracking.log_model=false"),
        # two steps must make a mask: start near the keep/drop boundary, take whole steps
        *("model.mask.init_keep_logit=0.5", "model.mask.lr=1.0"),
    )
    proc = _study(tmp_path, uri, *study)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`zoo.tag.study` = 'tiny'")
    by_kind = {}
    for r in runs:
        kind = r.data.tags.get("zoo.experiment") or r.data.tags["zoo.kind"]
        by_kind.setdefault(kind, []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {
        "sparsebert_minilm_dense": 1,
        "sparsebert_minilm_search": 1,
        "sparsebert_minilm_finetune": 1,
        "sparsebert_minilm_random": 1,
        "study": 1,
    }
    (search,) = by_kind["sparsebert_minilm_search"]
    (finetune,) = by_kind["sparsebert_minilm_finetune"]
    (random_run,) = by_kind["sparsebert_minilm_random"]
    density = search.data.metrics["val/mask_density"]
    assert 0.0 < density < 1.0
    # the fine-tune uses the search's mask, the random run a mask of the same density
    assert finetune.data.params["model.mask.from_run"] == search.info.run_id
    assert finetune.data.metrics["val/mask_density"] == pytest.approx(density, abs=1e-9)
    assert random_run.data.metrics["val/mask_density"] == pytest.approx(density, abs=1 / 4096)
    mask_file = client.download_artifacts(
        random_run.info.run_id, "masks/attention_mask.pt", str(tmp_path)
    )
    mask = torch.load(mask_file, weights_only=True)["mask"]
    assert mask.shape == (1, 12, 64, 64)  # MiniLM's 12 heads, the task's 64 tokens

    (summary,) = by_kind["study"]
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["method"] for r in rows) == ["dam_s", "dense", "random", "search:dam_s"]
    # the density on the test split's real tokens (the data rebuilt from the runs' config)
    dense_row = next(r for r in rows if r["method"] == "dense")
    assert dense_row["token_density"] == pytest.approx(1.0)
    assert all(0.0 < r["token_density"] <= 1.0 for r in rows)
    assert {r["run_id"] for r in rows} == {
        r.info.run_id for k, v in by_kind.items() if k != "study" for r in v
    }
    text = (out / "study.md").read_text()
    assert text.strip() in summary.data.tags["mlflow.note.content"]
    assert {
        "study/study.md",
        "study/results.json",
        "study/accuracy_vs_density.png",
        "study/accuracy_vs_token_density.png",
        "study/masks_dam_s_lambda100.png",
    } <= artifacts(client, summary.info.run_id)
    assert summary.data.metrics["acc_mean/dense"] == pytest.approx(
        by_kind["sparsebert_minilm_dense"][0].data.metrics["test/acc"]
    )

    # summarising again (no training) gives the same table; an empty study is one clear error
    again = _study(tmp_path, uri, "--study", "tiny", "--collect-only", "--out", str(out))
    assert again.returncode == 0 and (out / "study.md").read_text() == text
    summaries = client.search_runs([exp.experiment_id], "tags.`zoo.kind` = 'study'")
    assert [r.info.run_id for r in summaries] == [summary.info.run_id]  # updated, not added
    # the whole study again: every job has a FINISHED run, so nothing is trained twice
    again = _study(tmp_path, uri, *study)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train.py" not in again.stdout and again.stdout.count("already finished") == 4
    assert len(client.search_runs([exp.experiment_id], "")) == len(runs)
    empty = _study(tmp_path, uri, "--study", "nothing-yet", "--collect-only")
    assert empty.returncode == 1
    assert "has no finished run of study 'nothing-yet'" in empty.stderr
    assert "Traceback" not in empty.stderr


# --------------------------------------------------------------------------- cross-validation


def _cv(tmp_path, uri: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zoo.studies.cv", *args],
        cwd=tmp_path,
        env=cli_env({"MLFLOW_TRACKING_URI": uri, "ZOO_ROOT": str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


CV = ("experiment=eeg_cnn_lstm", "data.protocol=loso", "debug=fast", "data.subset=null")
CV_QUIET = ("tracking.log_model=false",)


def _folds(client, parent: str) -> dict[str, list]:
    exp = client.get_run(parent).info.experiment_id
    out: dict[str, list] = {}
    for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'"):
        out.setdefault(r.data.tags["zoo.tag.fold"], []).append(r)
    return out


def _parent(client, study: str):
    (run,) = client.search_runs(
        [client.get_experiment_by_name("zoo").experiment_id],
        f"tags.`zoo.kind` = 'study' and tags.`zoo.tag.study` = '{study}'",
    )
    return run


@pytest.mark.e2e
def test_a_loso_study_runs_every_fold_through_joblib_and_summarises_them(
    sqlite_uri, tmp_path, data_dir
):
    """3 subjects' LOSO through hydra/launcher=joblib with 2 jobs, plus a fourth listed subject
    whose file is missing: that fold fails naming the file, the others run, and the parent
    run's mean ± sd is the children's."""
    uri = sqlite_uri
    args = (*CV, *CV_QUIET, "data.subjects=[1,2,3,4]", "hydra/launcher=joblib")
    proc = _cv(tmp_path, uri, "--study", "loso3", *args, "hydra.launcher.n_jobs=2")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a fold is missing
    assert "s04.dat" in proc.stdout + proc.stderr
    client = MlflowClient(uri)
    parent = _parent(client, "loso3")
    folds = _folds(client, parent.info.run_id)
    assert sorted(folds) == ["1", "2", "3", "4"]
    assert [r.info.status for r in folds["4"]] == ["FAILED"]
    assert "s04.dat" in folds["4"][0].data.tags["zoo.failure"]
    finished = [folds[f][0] for f in ("1", "2", "3")]
    assert all(r.info.status == "FINISHED" for r in finished)
    for r in finished:  # each fold tested on its own subject, trained on the two others
        assert r.data.params["data.test_subject"] == r.data.tags["zoo.tag.fold"]
        assert r.data.params["data.subjects"] == "[1, 2, 3]"
    for metric in ("test/acc", "test/f1_macro", "test/loss"):
        values = np.array([r.data.metrics[metric] for r in finished])
        assert parent.data.metrics[metric] == pytest.approx(values.mean(), abs=1e-12)
        assert parent.data.metrics[f"{metric}_sd"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
        assert parent.data.metrics[f"{metric}_ci95_low"] == pytest.approx(values.mean() - half)
    assert parent.data.metrics["study/folds_missing"] == 1
    assert parent.info.status == "FAILED" and "4" in parent.data.tags["zoo.failure"]
    files = artifacts(client, parent.info.run_id)
    assert {
        "study/report.md",
        "study/report.html",
        "study/folds.json",
        "study/images/folds.png",
        "study/images/confusion_matrix_pooled.png",
    } <= files
    # the pooled confusion matrix counts every fold's test windows
    pooled = 0
    for r in finished:
        cm = json.loads(
            open(
                client.download_artifacts(r.info.run_id, "metrics/test_confusion_matrix.json")
            ).read()
        )
        pooled += np.asarray(cm["counts"])
    report_md = (tmp_path / "logs/studies/loso3/report.md").read_text()
    assert "s04.dat" in report_md and "3 of 4 finished" in report_md
    # evaluate.py on the parent: the study's report
    proc = run_cli(
        "evaluate.py", [f"run_id={parent.info.run_id}"], tmp_path, {"MLFLOW_TRACKING_URI": uri}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "logs/reports").glob("*/metrics.json")).read_text())
    assert metrics["test/acc"] == pytest.approx(parent.data.metrics["test/acc"])
    assert int(pooled.sum()) > 0


@pytest.mark.faults
def test_a_rerun_trains_only_the_fold_that_was_killed(sqlite_uri, tmp_path, data_dir):
    """Folds run one after another (Hydra's basic launcher); the last is SIGKILLed mid-way,
    which ends the multirun. Running the study again trains that fold alone."""
    uri = sqlite_uri
    kill = (
        "+callbacks.kill._target_=tests.faultinject.KillFoldAt",
        "+callbacks.kill.at_step=1",
        "+callbacks.kill.test_subject=3",
        "trainer.limit_train_batches=3",
    )
    proc = _cv(tmp_path, uri, "--study", "killed", *CV, *CV_QUIET, *kill)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    parent = _parent(client, "killed").info.run_id
    folds = _folds(client, parent)
    assert {f: [r.info.status for r in rs] for f, rs in folds.items()} == {
        "1": ["FINISHED"],
        "2": ["FINISHED"],
        "3": ["RUNNING"],  # SIGKILL: nothing could close the run
    }
    first = {f: rs[0].info.run_id for f, rs in folds.items()}
    proc = _cv(tmp_path, uri, "--study", "killed", *CV, *CV_QUIET, "trainer.limit_train_batches=3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 fold(s) already finished" in proc.stdout
    folds = _folds(client, parent)
    assert [r.info.run_id for r in folds["1"]] == [first["1"]]
    assert [r.info.run_id for r in folds["2"]] == [first["2"]]
    statuses = sorted(r.info.status for r in folds["3"])
    assert statuses == ["FINISHED", "KILLED"]  # the stale attempt closed, a new one trained
    assert client.get_run(parent).info.status == "FINISHED"


def test_a_study_refuses_an_override_of_the_fold_key(data_dir, capsys, monkeypatch):
    from zoo.studies import cv

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{data_dir}/refusals.db")
    for args, message, code in [
        ((*CV, "data.test_subject=2"), "data.test_subject=2: data.test_subject is what", 1),
        (("data.protocol=trial_kfold", "data.fold=1"), "data.fold=1: data.fold is what", 1),
        (("data.protocol=cross_subject",), "needs data.protocol=loso or trial_kfold", 2),
    ]:
        assert cv.main(["--collect-only", *args]) == code
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_a_sweep_among_the_overrides_is_one_study_per_value():
    from zoo.studies.cv import expand

    studies = expand(
        ["experiment=eeg_cnn_lstm", "model.net.rnn=lstm,gru", "hydra/launcher=joblib"]
        + ["hydra.launcher.n_jobs=2", "+trainer.max_time=null"]
    )
    assert [name for name, _ in studies] == ["rnn-lstm", "rnn-gru"]
    assert studies[1][1] == [
        "experiment=eeg_cnn_lstm",
        "model.net.rnn=gru",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "+trainer.max_time=null",
    ]
    assert expand(["data.subjects=[1,2]"]) == [("", ["data.subjects=[1,2]"])]


# --------------------------------------------------------------------------- RLHF frontier


def _frontier_row(coef, seed, score, kl, reward=None, win=0.5, ref=0.1):
    from zoo.studies.rlhf_frontier import Row

    reward = score - coef * kl if reward is None else reward
    return Row(coef, seed, score, kl, reward, win, ref, f"r{coef}-{seed}", "finished_sentence")


def test_the_frontier_table_pools_seeds_per_kl_coef():
    from zoo.plotting import close, reward_kl_frontier_figure
    from zoo.studies.rlhf_frontier import groups, reference_score, table

    rows = [
        _frontier_row(0.5, 1, 0.20, 1.0),
        _frontier_row(0.01, 0, 0.60, 8.0, win=0.9),
        _frontier_row(0.5, 0, 0.30, 2.0),
        _frontier_row(0.01, 1, 0.40, 6.0, win=0.7),
        _frontier_row(0.2, 0, 0.35, 3.0, ref=0.3),
    ]
    gs = groups(rows)
    assert [g["kl_coef"] for g in gs] == [0.01, 0.2, 0.5]
    low = gs[0]["stats"]
    assert gs[0]["seeds"] == [0, 1] and low["test/score"]["mean"] == pytest.approx(0.5)
    assert low["test/score"]["sd"] == pytest.approx(np.std([0.6, 0.4], ddof=1))
    assert low["test/kl"]["mean"] == pytest.approx(7.0)
    assert low["test/win_rate"]["mean"] == pytest.approx(0.8)
    assert low["test/rlhf_reward"]["mean"] == pytest.approx(np.mean([0.6 - 0.08, 0.4 - 0.06]))
    reference = reference_score(rows)
    assert reference == pytest.approx(0.14)
    text = table(gs, reference, [(0.2, 1)]).splitlines()
    assert text[0].startswith("| kl_coef | test/score (mean ± sd) | test/kl (mean ± sd) |")
    assert text[2].startswith("| 0.01 | 0.5000 ± 0.1414 | 7.0000 ± 1.4142 |")
    assert text[3] == (
        "| 0.2 | 0.3500 (one seed) | 3.0000 (one seed) | -0.2500 (one seed) "
        "| 0.5000 (one seed) | 0 |"
    )
    assert "test/reference_score 0.1400" in text[-3]
    assert text[-1] == "Jobs without a finished run: kl_coef=0.2 seed=1."
    fig = reward_kl_frontier_figure(rows, reference)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["kl_coef=0.5", "kl_coef=0.2", "kl_coef=0.01"]
    assert any(list(line.get_ydata()) == [reference, reference] for line in ax.lines)
    close(fig)


def _fake_frontier_jobs(uri: str, calls: list):
    """A stand-in for ``train.py -m``: records the overrides and writes the FINISHED runs the
    jobs would (a stage-1 run; PPO runs whose test metrics follow from kl_coef and seed)."""
    client = MlflowClient(uri)

    def multirun(overrides, train_script, env, check=True):
        calls.append(list(overrides))
        o = dict(x.lstrip("+").split("=", 1) for x in overrides)
        exp = client.get_experiment_by_name(o["tracking.experiment_name"])
        exp_id = (
            exp.experiment_id if exp else client.create_experiment(o["tracking.experiment_name"])
        )
        base = {"zoo.kind": "train", "zoo.tag.study": o["tags.study"]}
        if o["experiment"] == "rlhf_reward_demo":
            r = client.create_run(exp_id, tags={**base, "zoo.experiment": o["experiment"]})
            client.set_terminated(r.info.run_id, "FINISHED")
            return 0
        for coef in o["model.kl_coef"].split(","):
            for seed in o["seed"].split(","):
                r = client.create_run(exp_id, tags={**base, "zoo.experiment": o["experiment"]})
                run_id, c, s = r.info.run_id, float(coef), int(seed)
                client.log_param(run_id, "model.kl_coef", coef)
                client.log_param(run_id, "seed", seed)
                client.log_param(run_id, "model.reward.from_run", o["model.reward.from_run"])
                score, kl = 0.5 - c + 0.01 * s, 2.0 - c - 0.1 * s
                metrics = {
                    "test/score": score,
                    "test/kl": kl,
                    "test/rlhf_reward": score - c * kl,
                    "test/win_rate": 0.6 + 0.05 * s,
                    "test/reference_score": 0.2,
                }
                for k, v in metrics.items():
                    client.log_metric(run_id, k, v)
                client.set_terminated(run_id, "FINISHED")
        return 0

    return multirun


def test_the_frontier_trains_stage_one_once_and_only_the_missing_ppo_jobs(
    sqlite_uri, tmp_path, monkeypatch, capsys
):
    """rlhf_ppo_demo needs a stage-1 reward run: the study trains it once, gives its id to
    every PPO job (one multirun over kl_coef × seed), summarises; run again with one more
    seed, it reuses the reward run and trains only that seed's jobs."""
    from zoo.studies import rlhf_frontier

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    calls: list[list[str]] = []
    monkeypatch.setattr(rlhf_frontier, "multirun", _fake_frontier_jobs(sqlite_uri, calls))
    out = tmp_path / "out"
    argv = ["--kl-coefs", "0.01", "0.2", "--out", str(out), "--", "data.batch_size=4"]
    assert rlhf_frontier.main(["--seeds", "0", "1", *argv]) == 0
    reward, ppo = calls
    assert reward[0] == "experiment=rlhf_reward_demo" and reward[-1] == "data.batch_size=4"
    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name("frontier-rlhf_ppo_demo")
    (stage1,) = client.search_runs(
        [exp.experiment_id], "tags.`zoo.experiment` = 'rlhf_reward_demo'"
    )
    assert f"model.reward.from_run={stage1.info.run_id}" in ppo
    assert ppo[-3:] == ["data.batch_size=4", "model.kl_coef=0.01,0.2", "seed=0,1"]
    summary = json.loads((out / "frontier.json").read_text())
    assert summary["rewards"] == [f"run {stage1.info.run_id}"]
    high = next(g for g in summary["kl_coefs"] if g["kl_coef"] == 0.2)["stats"]
    assert high["test/score"]["mean"] == pytest.approx(0.305)
    assert high["test/kl"]["sd"] == pytest.approx(np.std([1.8, 1.7], ddof=1))

    calls.clear()
    capsys.readouterr()
    assert rlhf_frontier.main(["--seeds", "0", "1", "2", *argv]) == 0
    (ppo,) = calls  # no stage 1: its FINISHED run is found by the study's tag
    assert ppo[-2:] == ["model.kl_coef=0.01,0.2", "seed=2"]
    assert f"model.reward.from_run={stage1.info.run_id}" in ppo
    printed = capsys.readouterr().out
    assert f"run {stage1.info.run_id} already finished, used" in printed
    assert "4 job(s) already finished, skipped" in printed
    (study,) = client.search_runs([exp.experiment_id], "tags.`zoo.kind` = 'study'")
    assert study.info.status == "FINISHED" and study.data.tags["zoo.study.runs"] == "6"
    assert (out / "frontier.md").read_text().strip() in study.data.tags["mlflow.note.content"]
    assert study.data.metrics["kl_coef_0.01/score_mean"] == pytest.approx(0.5)  # seeds 0-2
    assert {"study/frontier.md", "study/frontier.json", "study/frontier.png"} <= artifacts(
        client, study.info.run_id
    )
    # a seed whose jobs are missing, as after a killed job: exit 1, the table names them
    calls.clear()
    monkeypatch.setattr(rlhf_frontier, "multirun", lambda *a, **k: calls.append(a) or 1)
    assert rlhf_frontier.main(["--seeds", "0", "3", *argv]) == 1
    assert "kl_coef=0.01 seed=3, kl_coef=0.2 seed=3" in (out / "frontier.md").read_text()
    assert "2 job(s) without a finished run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ppo-experiment", "nope"], "--ppo-experiment nope: there is no such experiment"),
        (["--ppo-experiment", "rlhf_reward_demo"], "its model is zoo.models.rlhf.RewardModel"),
        (["--kl-coefs"], "--kl-coefs: no KL coefficient given"),
        (["--kl-coefs", "0.1", "-0.5"], "--kl-coefs -0.5: a KL coefficient weighs the penalty"),
        (["--seeds"], "--seeds: no seed given"),
        (["--", "model.kl_coef=0.3"], "the study sets model.kl_coef for every job; choose it"),
        (["--", "model.nope=1"], "do not compose with experiment=rlhf_ppo_demo"),
    ],
)
def test_the_frontier_refuses_bad_input_in_one_paragraph(argv, message, capsys, monkeypatch):
    from zoo.studies import rlhf_frontier

    monkeypatch.setattr(rlhf_frontier, "multirun", lambda *a, **k: pytest.fail("ran a job"))
    assert rlhf_frontier.main(["--collect-only", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _frontier(tmp_path, uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zoo.studies.rlhf_frontier", *args],
        cwd=tmp_path,
        env=cli_env({"MLFLOW_TRACKING_URI": uri}),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.e2e
def test_the_frontier_study_runs_ppo_per_kl_coef_and_seed_and_summarises(
    sqlite_uri, tmp_path, data_dir
):
    """Four real PPO jobs of the tiny demo (2 kl_coefs × 2 seeds, debug=fast, programmatic
    reward: no stage 1) as one train.py multirun, then the summary run; a rerun trains none."""
    uri, out = sqlite_uri, tmp_path / "summary"
    study = (
        *("--ppo-experiment", "rlhf_ppo_tiny_demo", "--kl-coefs", "0.01", "0.5"),
        *("--seeds", "0", "1", "--out", str(out), "--", "debug=fast", "tracking.log_model=false"),
    )
    proc = _frontier(tmp_path, uri, *study)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("train.py -m") == 1  # one multirun for the whole grid
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("frontier-rlhf_ppo_tiny_demo")
    tagged = "tags.`zoo.tag.study` = 'frontier-rlhf_ppo_tiny_demo'"
    runs = client.search_runs([exp.experiment_id], f"{tagged} and tags.`zoo.kind` = 'train'")
    grid = {(float(r.data.params["model.kl_coef"]), int(r.data.params["seed"])) for r in runs}
    assert len(runs) == 4 and grid == {(0.01, 0), (0.01, 1), (0.5, 0), (0.5, 1)}
    for r in runs:
        m, coef = r.data.metrics, float(r.data.params["model.kl_coef"])
        assert r.info.status == "FINISHED" and r.data.tags["zoo.experiment"] == "rlhf_ppo_tiny_demo"
        assert r.data.params["model.reward.callable"] == "zoo.models.rlhf.finished_sentence"
        assert m["test/kl"] >= 0  # the sweep's kl_coef is the one the job's penalty used
        assert m["test/rlhf_reward"] == pytest.approx(m["test/score"] - coef * m["test/kl"])
    (summary,) = client.search_runs([exp.experiment_id], f"{tagged} and tags.`zoo.kind` = 'study'")
    assert summary.info.status == "FINISHED"
    text = (out / "frontier.md").read_text()
    assert text.strip() in summary.data.tags["mlflow.note.content"]
    assert {"study/frontier.md", "study/frontier.json", "study/frontier.png"} <= artifacts(
        client, summary.info.run_id
    )
    table = json.loads((out / "frontier.json").read_text())
    assert [g["kl_coef"] for g in table["kl_coefs"]] == [0.01, 0.5]
    for g in table["kl_coefs"]:
        mine = [r for r in runs if float(r.data.params["model.kl_coef"]) == g["kl_coef"]]
        assert sorted(g["run_ids"]) == sorted(r.info.run_id for r in mine)
        for metric in ("test/score", "test/kl", "test/rlhf_reward", "test/win_rate"):
            values = np.array([r.data.metrics[metric] for r in mine])
            assert g["stats"][metric]["mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert g["stats"][metric]["sd"] == pytest.approx(values.std(ddof=1), abs=1e-12)
            key = f"kl_coef_{g['kl_coef']:g}/{metric[5:]}_mean"
            assert summary.data.metrics[key] == pytest.approx(values.mean(), abs=1e-12)
    reference = [r.data.metrics["test/reference_score"] for r in runs]
    assert table["reference_score"] == pytest.approx(np.mean(reference))

    # the same command again: every job has a FINISHED run, so nothing is trained twice
    again = _frontier(tmp_path, uri, *study)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train.py" not in again.stdout and "4 job(s) already finished" in again.stdout
    assert (out / "frontier.md").read_text() == text
    assert len(client.search_runs([exp.experiment_id], "")) == 5  # 4 jobs, 1 summary, updated
