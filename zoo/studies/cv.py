"""Cross-validation as one study: every fold of an experiment, one summary.

    python -m zoo.studies.cv experiment=eeg_cnn_lstm data.protocol=loso      # a fold per subject
    python -m zoo.studies.cv experiment=eeg_cnn_lstm data.protocol=trial_kfold data.n_folds=5
    python -m zoo.studies.cv experiment=eeg_cnn_lstm data=deap data.data_dir=/data/deap \\
        data.protocol=loso hydra/launcher=joblib hydra.launcher.n_jobs=4    # folds in parallel
    python -m zoo.studies.cv --collect-only experiment=eeg_cnn_lstm data.protocol=loso
    python -m zoo.studies.cv experiment=eeg_cnn_lstm data.protocol=loso model.net.rnn=lstm,gru

The data module says what its folds are (``cross_validation()``: for DEAP, ``data.test_subject``
over the subjects found, or ``data.fold`` over ``data.n_folds``). The folds are one ``train.py``
multirun over that key, so Hydra's launchers (``hydra/launcher=joblib``, ``submitit_slurm``)
parallelise them; any other override applies to every fold. A sweep among the overrides
(``model.net.rnn=lstm,gru``) runs one study per value, named after it
(``cv-eeg_cnn_lstm-loso-rnn-gru``), each with its own parent run, so they compare in the UI.

mlflow gets one parent run (tag ``zoo.kind=study``, run name = the study) and one child run per
fold (``mlflow.parentRunId``: the UI nests the folds under the study; tags ``zoo.tag.study``,
``zoo.tag.fold``). The parent gets the per-fold table, mean ± sd and a 95% interval of every test
metric, a per-fold plot, the confusion matrix pooled over the folds and a Markdown/HTML summary,
and the fold mean of every test metric as its own metric (``test/acc`` ...), so studies compare
in the UI like runs. ``python evaluate.py run_id=<parent>`` writes the same report.

A rerun of the same study runs only the folds without a FINISHED run (``--rerun``: all of
them), so a study whose jobs were killed or failed goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import ZooError
from zoo.studies.common import REPO, TAG_STUDY, StudyError, mean_sd_ci, multirun, study_runs

TAG_FOLD = "zoo.tag.fold"
TAG_KEY = "zoo.study.fold_key"
TAG_FOLDS = "zoo.study.folds"
TAG_OVERRIDES = "zoo.study.overrides"
STUDY_TYPE = "cv"


# --------------------------------------------------------------------------- the plan


@dataclass
class Study:
    """A cross-validation study: its name, the folds and where its runs live."""

    name: str
    overrides: list[str]  # the user's, for every fold
    key: str  # data.test_subject | data.fold
    values: list[Any]
    shared: list[str]
    unavailable: dict[Any, tuple[str, list[str]]]
    uri: str
    experiment: str


def _is_hydra(override: str) -> bool:
    return override.lstrip("+~").startswith(("hydra/", "hydra."))


def expand(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """Sweeps in the overrides (``model.net.rnn=lstm,gru``, ``range(...)``), multirun-style:
    one study per combination, as (name suffix, its overrides); one study when there is none."""
    import itertools
    import re

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        if o.is_sweep_override() and not _is_hydra(o.input_line):
            prefix = o.input_line.split(o.key_or_group, 1)[0]  # +, ++ or ~
            choices.append([(o, prefix, v) for v in o.sweep_string_iterator()])
        else:
            choices.append([(o, None, None)])
    out = []
    for combo in itertools.product(*choices):
        parts = [f"{p}{o.key_or_group}={v}" if v is not None else o.input_line for o, p, v in combo]
        tag = "_".join(
            f"{o.key_or_group.split('.')[-1]}-{re.sub(r'[^A-Za-z0-9_.-]', '_', v)}"
            for o, _, v in combo
            if v is not None
        )
        out.append((tag, parts))
    return out


def compose(overrides: list[str]):
    """The training config these overrides give (Hydra's own overrides left out)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import zoo.config  # noqa: F401  (the config resolvers)

    GlobalHydra.instance().clear()  # a study is never run inside a Hydra app
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", [o for o in overrides if not _is_hydra(o)])


def plan(overrides: list[str], name: str | None) -> Study:
    """Compose the config, ask its data module for the folds, refuse overrides that set the
    fold key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from zoo import tracking
    from zoo.errors import ConfigError, one_line

    cfg = compose(overrides)
    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as exc:
        raise ConfigError(f"could not build 'data': {one_line(str(exc))}") from exc
    folds = datamodule.cross_validation()
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key == folds.key:
            raise StudyError(
                f"{o}: {folds.key} is what the study sets, one value per fold "
                f"(data.protocol={OmegaConf.select(cfg, 'data.protocol')}: {folds.key} over "
                f"{folds.values}). Leave it out; choose the folds with the data's own keys "
                "(data.subjects, data.n_folds)."
            )
    protocol = OmegaConf.select(cfg, "data.protocol") or "folds"
    uri = tracking.open_store(OmegaConf.select(cfg, "tracking.tracking_uri"))
    return Study(
        name=name or f"cv-{cfg.get('name')}-{protocol}",
        overrides=list(overrides),
        key=folds.key,
        values=list(folds.values),
        shared=list(folds.shared),
        unavailable=dict(folds.unavailable),
        uri=uri,
        experiment=str(OmegaConf.select(cfg, "tracking.experiment_name") or "zoo"),
    )


def parent_run(client, study: Study) -> str:
    """The study's parent run, created on first use (a rerun finds it by the study's name)."""
    from zoo import tracking

    exp_id = tracking.ensure_experiment(study.uri, study.experiment)
    runs = client.search_runs(
        [exp_id],
        f"tags.`zoo.kind` = 'study' and tags.`{TAG_STUDY}` = '{study.name}'",
        order_by=["attributes.start_time ASC"],
    )
    mine = " ".join(o for o in study.overrides if not _is_hydra(o))
    if runs:
        run = runs[0]
        theirs = run.data.tags.get(TAG_OVERRIDES, "")
        if theirs != mine:  # each fold's run keeps its own config and params
            print(
                f"warning: study {study.name!r} (run {run.info.run_id}) was started with the "
                f"overrides '{theirs}'; the folds run now get '{mine}' (give a study of other "
                "settings its own --study name)",
                file=sys.stderr,
            )
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(
        exp_id,
        run_name=study.name,
        tags={
            "zoo.kind": "study",
            "zoo.study.type": STUDY_TYPE,
            TAG_STUDY: study.name,
            TAG_KEY: study.key,
            TAG_FOLDS: ",".join(map(str, study.values)),
            TAG_OVERRIDES: mine,
            "mlflow.note.content": f"Cross-validation study {study.name}: running.",
        },
    )
    return run.info.run_id


def fold_runs(client, experiment_id: str, study: str, parent: str) -> dict[str, list]:
    """The study's fold runs, newest first, by fold value (as a string)."""
    by_fold: dict[str, list] = {}
    for r in study_runs(client, experiment_id, study, f"tags.`mlflow.parentRunId` = '{parent}'"):
        by_fold.setdefault(r.data.tags.get(TAG_FOLD, ""), []).append(r)
    return by_fold


def run_folds(client, study: Study, parent: str, args, env: dict[str, str]) -> int:
    """Run the folds without a FINISHED run (all with ``--rerun``); an older attempt still
    marked RUNNING (its job was killed) is closed as KILLED. Returns the number of failed
    multiruns."""
    exp_id = client.get_run(parent).info.experiment_id
    runs = fold_runs(client, exp_id, study.name, parent)
    done = set()
    if not args.rerun:
        done = {v for v, rs in runs.items() if any(r.info.status == "FINISHED" for r in rs)}
    todo = [v for v in study.values if str(v) not in done]
    if done:
        print(f"{len(done)} fold(s) already finished, skipped: {sorted(done)}", flush=True)
    for v in todo:
        for r in runs.get(str(v), []):
            if r.info.status == "RUNNING":
                client.set_tag(r.info.run_id, "zoo.failure", "its job ended without closing it")
                client.set_terminated(r.info.run_id, "KILLED")
    common = [
        *study.overrides,
        f"+tracking.parent_run_id={parent}",
        f"++tags.study='{study.name}'",
        f"++tags.fold=${{{study.key}}}",
        f"tracking.experiment_name={study.experiment}",
    ]
    failures = 0
    runnable = [v for v in todo if v not in study.unavailable]
    if runnable:
        sweep = f"{study.key}=" + ",".join(map(str, runnable))
        failures += multirun([*common, *study.shared, sweep], args.train_script, env, False) != 0
    for v in todo:
        if v in study.unavailable:
            reason, extra = study.unavailable[v]
            print(f"fold {v} cannot run ({reason}): its job will fail naming it", flush=True)
            overrides = [*common, *extra, f"{study.key}={v}"]
            failures += multirun(overrides, args.train_script, env, False) != 0
    return failures


# --------------------------------------------------------------------------- the summary


@dataclass
class Summary:
    study: str
    key: str
    folds: list[dict[str, Any]]  # fold, run_id, test metrics
    missing: dict[str, str]  # fold -> why
    stats: dict[str, dict[str, float]]  # metric -> mean, sd, ci_low, ci_high, n
    confusion: np.ndarray | None
    class_names: list[str]


def _confusion(client, run_id: str) -> tuple[np.ndarray, list[str]] | None:
    from zoo.models.classification import TEST_CONFUSION_ARTIFACT

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, TEST_CONFUSION_ARTIFACT, tmp)
            data = json.loads(Path(path).read_text())
    except Exception:  # a fold of a model without a confusion matrix
        return None
    return np.asarray(data["counts"], dtype=np.int64), list(data["class_names"])


def collect(client, parent: str) -> Summary:
    """The study as its parent run and its children say it is now."""
    run = client.get_run(parent)
    tags = run.data.tags
    study, key = tags[TAG_STUDY], tags.get(TAG_KEY, "fold")
    values = [v for v in tags.get(TAG_FOLDS, "").split(",") if v]
    runs = fold_runs(client, run.info.experiment_id, study, parent)
    folds, missing, cms, names = [], {}, [], []
    for v in values:
        attempts = runs.get(v, [])
        finished = [r for r in attempts if r.info.status == "FINISHED"]
        if not finished:
            if attempts:
                last = attempts[0]
                why = last.data.tags.get("zoo.failure") or f"its run is {last.info.status}"
                missing[v] = f"{last.info.status}: {why} (run {last.info.run_id})"
            else:
                missing[v] = "no run yet"
            continue
        r = finished[0]
        metrics = {k: float(x) for k, x in r.data.metrics.items() if k.startswith("test/")}
        folds.append({"fold": v, "run_id": r.info.run_id, **metrics})
        cm = _confusion(client, r.info.run_id)
        if cm is not None:
            cms.append(cm[0])
            names = cm[1]
    metric_names = sorted({k for f in folds for k in f if k.startswith("test/")})
    stats = {m: mean_sd_ci([f[m] for f in folds if m in f]) for m in metric_names}
    confusion = np.sum(cms, axis=0) if cms else None
    return Summary(study, key, folds, missing, stats, confusion, names)


def _fold_figure(summary: Summary, metrics: list[str]):
    """One box per test metric with the folds as labelled points."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 * len(metrics) + 2.5, 4.2), dpi=100)
    data = [[f[m] for f in summary.folds if m in f] for m in metrics]
    ax.boxplot(data, widths=0.5, showmeans=True)
    rng = np.random.default_rng(0)
    for i, (m, values) in enumerate(zip(metrics, data), start=1):
        xs = i + rng.uniform(-0.12, 0.12, len(values))
        ax.scatter(xs, values, s=22, zorder=3, color="tab:blue")
        if len(values) <= 12:
            for x, y, f in zip(xs, values, [f for f in summary.folds if m in f]):
                ax.annotate(
                    str(f["fold"]), (x, y), fontsize=7, xytext=(4, 0), textcoords="offset points"
                )
    ax.set_xticks(range(1, len(metrics) + 1), metrics)
    ax.set_ylabel("value per fold")
    ax.set_title(f"{summary.study}: {len(summary.folds)} folds ({summary.key})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def report(summary: Summary):
    """The study's report (``zoo.reports.Report``) and its flat metrics."""
    from zoo.plotting import confusion_matrix_figure
    from zoo.reports import Report

    r = Report(f"Cross-validation study: {summary.study}")
    n_all = len(summary.folds) + len(summary.missing)
    r.key_values(
        {
            "folds": f"{len(summary.folds)} of {n_all} finished ({summary.key})",
            "missing folds": ", ".join(f"{k} ({v})" for k, v in summary.missing.items()) or "none",
        }
    )
    if summary.missing:
        r.paragraph(
            f"{len(summary.missing)} fold(s) have no finished run, so the figures below cover "
            f"{len(summary.folds)} of {n_all} folds. Run the study again to run only those."
        )
    r.heading("Test metrics over the folds")
    r.table(
        ["metric", "mean", "sd", "95% interval of the mean", "folds"],
        [
            [m, s["mean"], s["sd"], f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]", s["n"]]
            for m, s in summary.stats.items()
        ],
    )
    metrics = [m for m in summary.stats if m != "test/loss"] or list(summary.stats)
    r.heading("Per fold")
    r.table(
        [summary.key, "run", *summary.stats],
        [[f["fold"], f["run_id"], *[f.get(m, "") for m in summary.stats]] for f in summary.folds],
    )
    if summary.folds:
        r.image(_fold_figure(summary, metrics), "test metrics per fold", "folds")
    if summary.confusion is not None:
        r.heading("Confusion matrix, pooled over the folds")
        r.image(
            confusion_matrix_figure(
                summary.confusion, summary.class_names, "test, pooled over folds"
            ),
            "test confusion matrix summed over the folds",
            "confusion_matrix_pooled",
        )
    flat = {}
    for m, s in summary.stats.items():
        flat[m] = s["mean"]
        flat[f"{m}_sd"] = s["sd"]
        flat[f"{m}_ci95_low"] = s["ci_low"]
        flat[f"{m}_ci95_high"] = s["ci_high"]
    flat["study/folds_finished"] = float(len(summary.folds))
    flat["study/folds_missing"] = float(len(summary.missing))
    return r, flat


def table_text(summary: Summary) -> str:
    lines = ["| metric | mean ± sd | 95% interval | folds |", "|---|---|---|---|"]
    for m, s in summary.stats.items():
        lines.append(
            f"| {m} | {s['mean']:.4f} ± {s['sd']:.4f} | [{s['ci_low']:.4f}, {s['ci_high']:.4f}] "
            f"| {s['n']} |"
        )
    if summary.missing:
        lines.append("")
        lines.append("Missing folds: " + "; ".join(f"{k}: {v}" for k, v in summary.missing.items()))
    return "\n".join(lines)


def summarise(client, parent: str, out: Path) -> Summary:
    """Write the report to ``out`` and log it, its metrics and its description to the parent."""
    summary = collect(client, parent)
    if not summary.folds:
        client.set_tag(parent, "mlflow.note.content", table_text(summary))
        client.set_terminated(parent, "FAILED")
        raise StudyError(
            f"study {summary.study}: no fold has finished yet ("
            + "; ".join(f"fold {k}: {v}" for k, v in summary.missing.items())
            + ")"
        )
    rep, flat = report(summary)
    files = rep.write(out, flat)
    (out / "folds.json").write_text(json.dumps(summary.folds, indent=1))
    client.log_artifacts(parent, str(out), "study")
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, 0) for k, v in flat.items() if np.isfinite(v)]
    for i in range(0, len(values), 500):
        client.log_batch(parent, metrics=values[i : i + 500])
    text = table_text(summary)
    client.set_tag(
        parent, "mlflow.note.content", f"Cross-validation study {summary.study}.\n\n{text}"
    )
    client.set_tag(parent, "zoo.study.folds_finished", str(len(summary.folds)))
    if summary.missing:
        client.set_tag(
            parent, "zoo.failure", f"folds without a finished run: {sorted(summary.missing)}"
        )
    client.set_terminated(parent, "FAILED" if summary.missing else "FINISHED")
    print(f"\n{text}\n\nreport: {files['html']} (logged to the study's run {parent} under study/)")
    return summary


# --------------------------------------------------------------------------- command line


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zoo.studies.cv",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--study", help="the study's name (default cv-<experiment>-<protocol>)")
    parser.add_argument("--rerun", action="store_true", help="run every fold, even FINISHED ones")
    parser.add_argument("--collect-only", action="store_true", help="only summarise")
    parser.add_argument("--out", type=Path, help="default logs/studies/<study>")
    parser.add_argument("--train-script", type=Path, default=REPO / "train.py")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every fold")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        studies = expand(args.overrides)
    except Exception as exc:  # Hydra's override grammar
        print(f"study error: {exc}", file=sys.stderr)
        return 2
    codes = []
    for suffix, overrides in studies:
        if len(studies) > 1:
            print(f"\n== study {len(codes) + 1} of {len(studies)}: {suffix} ==", flush=True)
        codes.append(run_study(args, overrides, suffix))
    return max(codes)


def run_study(args, overrides: list[str], suffix: str) -> int:
    """One study: plan it, run its folds (those not yet finished), summarise it."""
    try:
        from zoo import tracking

        study = plan(overrides, args.study)
        if suffix:
            study.name = f"{study.name}-{suffix}"
        client = tracking.client(study.uri)
        parent = parent_run(client, study)
        print(
            f"study {study.name}: {len(study.values)} folds over {study.key} "
            f"({', '.join(map(str, study.values))}); parent run {parent}",
            flush=True,
        )
        failed = 0
        if not args.collect_only:
            env = {**os.environ, "MLFLOW_TRACKING_URI": study.uri}
            failed = run_folds(client, study, parent, args, env)
        out = (args.out / study.name if suffix else args.out) if args.out else None
        out = out or Path("logs") / "studies" / study.name
        summary = summarise(client, parent, out)
    except (StudyError, ZooError) as err:
        print(f"study error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    if summary.missing or failed:
        print(
            f"{len(summary.missing)} fold(s) without a finished run: run the same command again "
            "to run only those",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
