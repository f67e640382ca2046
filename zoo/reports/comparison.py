"""Side-by-side comparison of mlflow runs: final metrics, differing params, learning curves."""

from __future__ import annotations

from zoo.reports.report import Report

CURVE_METRICS = ("train/loss", "val/loss", "val/acc", "val/f1_macro")


def run_label(run) -> str:
    name = run.data.tags.get("mlflow.runName") or run.info.run_name or ""
    return f"{name} ({run.info.run_id[:8]})"


def comparison_report(
    client, runs: list, curve_metrics=CURVE_METRICS
) -> tuple[Report, dict[str, float]]:
    from zoo.plotting import learning_curves_figure

    labels = [run_label(r) for r in runs]
    report = Report(f"Comparison of {len(runs)} runs")
    report.heading("Runs")
    report.table(
        ["run", "run id", "experiment", "model", "status", "git commit"],
        [
            [
                lab,
                r.info.run_id,
                r.data.tags.get("zoo.experiment", ""),
                r.data.tags.get("zoo.model", ""),
                r.info.status,
                r.data.tags.get("zoo.git_commit", "")[:12],
            ]
            for lab, r in zip(labels, runs)
        ],
    )

    report.heading("Final metrics")
    keys = sorted(set().union(*(r.data.metrics for r in runs)))
    rows, flat = [], {}
    for k in keys:
        values = [r.data.metrics.get(k) for r in runs]
        rows.append([k, *("" if v is None else float(v) for v in values)])
        for r, v in zip(runs, values):
            if v is not None:
                flat[f"{r.info.run_id}/{k}"] = float(v)
    report.table(["metric", *labels], rows)

    report.heading("Parameters that differ")
    pkeys = sorted(set().union(*(r.data.params for r in runs)))
    diff = [
        [k, *(r.data.params.get(k, "—") for r in runs)]
        for k in pkeys
        if len({r.data.params.get(k) for r in runs}) > 1
        and not k.startswith(("tracking.", "paths."))
    ]
    if diff:
        report.table(["param", *labels], diff)
    else:
        report.paragraph("All logged parameters are equal.")

    histories = {}
    for metric in curve_metrics:
        per_run = {}
        for lab, r in zip(labels, runs):
            hist = client.get_metric_history(r.info.run_id, metric)
            per_run[lab] = sorted((m.step, m.value) for m in hist)
        if any(per_run.values()):
            histories[metric] = per_run
    report.heading("Learning curves")
    if histories:
        report.image(
            learning_curves_figure(histories, "Learning curves (from mlflow metric history)"),
            "learning curves",
            "learning_curves",
        )
    else:
        report.paragraph(f"None of the runs logged any of {', '.join(curve_metrics)}.")
    return report, flat
