"""Regenerate the figures in docs/images/ with the zoo's own code.

Each figure comes from a real run or study: give its mlflow run id (and the store with
``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``), or, for the figures whose run is short enough,
leave the id out and the script trains it first, in a temporary folder with its own store.

    python docs/make_figures.py cv [--run-id <study parent run>]    # cv_loso_folds.png
    python docs/make_figures.py minilm --tracking-uri <store>       # minilm_*.png (the 2 h study)
    python docs/make_figures.py pix2pix [--run-id <run>]            # pix2pix_demo_test_grid.png
    python docs/make_figures.py masks [--run-id <run>]              # sparsebert_demo_masks.png
    python docs/make_figures.py pr [--run-id <run>]                 # detection_demo_*.png
    python docs/make_figures.py lidar [--run-id <run>]              # minkunet_demo_*.png

A ``--run-id`` names a run of the experiment the figure shows: ``pix2pix_demo``,
``sparsebert_dam_search_demo``, ``detection_groupsoftmax_demo``, ``minkunet_demo``.

Without a run id: ``cv`` trains an 8-subject LOSO study (generated subjects, 3 epochs of 20
batches, ~10 min on 2 cores), ``pix2pix`` the demo (~2 min), ``masks`` the DAM search demo
(~1 min), ``pr`` the GroupSoftmax detection demo (~12 min), ``lidar`` the MinkUNet demo.
``minilm`` needs the store the MiniLM density study ran in (see docs/families/sparsebert.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _train(tmp: Path, uri: str, overrides: list[str]) -> str:
    """Train one run with train.py in ``tmp`` and return its mlflow run id."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ZOO_DATA_DIR": str(tmp / "data")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"train.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    match = re.search(r"mlflow run id\s*:\s*(\w+)", proc.stdout + proc.stderr)
    if not match:
        sys.exit("train.py did not print its run id")
    return match.group(1)


def _artifact(uri: str, run_id: str, pattern: str, dest: str) -> Path:
    """Copy the run's artifact that matches ``pattern`` (a regex on its path) to docs/images."""
    client = _client(uri)

    def walk(path: str = ""):
        for item in client.list_artifacts(run_id, path):
            yield from walk(item.path) if item.is_dir else [item.path]

    found = sorted(p for p in walk() if re.fullmatch(pattern, p))
    if not found:
        sys.exit(f"run {run_id} has no artifact matching {pattern}")
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, found[-1], tmp)
        target = IMAGES / dest
        shutil.copyfile(local, target)
    print(f"{target}  <- runs:/{run_id}/{found[-1]}")
    return target


def cv(args) -> None:
    """The fold plot of a LOSO study, drawn by zoo.studies.cv from the study's runs."""
    from zoo.studies import cv as study

    uri, parent = args.tracking_uri, args.run_id
    if parent is None:
        from zoo.data.demo.deap import write_demo_deap

        tmp = Path(tempfile.mkdtemp(prefix="zoo-figures-cv-"))
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        write_demo_deap(tmp / "deap", n_subjects=8)
        overrides = [
            "experiment=eeg_cnn_lstm",
            "data=deap",
            f"data.data_dir={tmp / 'deap'}",
            "data.protocol=loso",
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=20",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
        ]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        subprocess.run(
            [sys.executable, "-m", "zoo.studies.cv", *overrides], cwd=tmp, env=env, check=False
        )
        client = _client(uri)
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            "tags.`zoo.kind` = 'study'",
        )
        parent = runs[0].info.run_id
    summary = study.collect(_client(uri), parent)
    metrics = [m for m in summary.stats if m != "test/loss"] or list(summary.stats)
    fig = study._fold_figure(summary, metrics)
    fig.savefig(IMAGES / "cv_loso_folds.png", dpi=100)
    print(f"{IMAGES / 'cv_loso_folds.png'}  <- study run {parent}")


def minilm(args) -> None:
    """The density study's plot and mask heatmaps, drawn by zoo.studies.sparse_attention."""
    from zoo.studies import sparse_attention

    client = _client(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sparse_attention.summarise(
            client, exp.experiment_id if exp else None, args.study, out, args.tracking_uri
        )
        for name, dest in (
            ("accuracy_vs_token_density.png", "minilm_accuracy_vs_token_density.png"),
            ("masks_dam_u_lambda0.3.png", "minilm_masks_dam_u_lambda0.3.png"),
            ("masks_dam_s_lambda1.png", "minilm_masks_dam_s_lambda1.png"),
        ):
            if (out / name).exists():
                shutil.copyfile(out / name, IMAGES / dest)
                print(f"{IMAGES / dest}  <- study {args.study}")


def _run_or_train(args, overrides: list[str]) -> tuple[str, str]:
    if args.run_id:
        return args.tracking_uri, args.run_id
    tmp = Path(tempfile.mkdtemp(prefix="zoo-figures-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return uri, _train(tmp, uri, overrides + list(args.overrides))


def pix2pix(args) -> None:
    uri, run = _run_or_train(args, ["experiment=pix2pix_demo"])
    _artifact(uri, run, r"figures/test/grid\.png", "pix2pix_demo_test_grid.png")


def masks(args) -> None:
    uri, run = _run_or_train(args, ["experiment=sparsebert_dam_search_demo"])
    _artifact(uri, run, r"figures/val/attention_masks_epoch\d+\.png", "sparsebert_demo_masks.png")


def pr(args) -> None:
    uri, run = _run_or_train(args, ["experiment=detection_groupsoftmax_demo"])
    _artifact(uri, run, r"figures/test/pr_curves[^/]*\.png", "detection_demo_pr_curves.png")
    _artifact(uri, run, r"figures/test/ap_per_class[^/]*\.png", "detection_demo_ap_per_class.png")


def lidar(args) -> None:
    uri, run = _run_or_train(args, ["experiment=minkunet_demo"])
    _artifact(uri, run, r"figures/test/bev\.png", "minkunet_demo_bev.png")
    _artifact(uri, run, r"figures/test/confusion_matrix\.png", "minkunet_demo_confusion.png")


FIGURES = {
    "cv": cv,
    "minilm": minilm,
    "pix2pix": pix2pix,
    "masks": masks,
    "pr": pr,
    "lidar": lidar,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("figure", choices=[*FIGURES, "all"])
    parser.add_argument(
        "overrides", nargs="*", help="extra train.py overrides for a run the script trains"
    )
    parser.add_argument("--run-id", help="the run (or study parent run) to draw from")
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    )
    parser.add_argument("--study", default="minilm-density", help="minilm: the study's name")
    parser.add_argument("--experiment", default="zoo", help="minilm: its mlflow experiment")
    args = parser.parse_args(argv)
    IMAGES.mkdir(parents=True, exist_ok=True)
    names = [n for n in FIGURES if n != "minilm"] if args.figure == "all" else [args.figure]
    for name in names:
        FIGURES[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
