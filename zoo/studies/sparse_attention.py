"""SparseBERT's claim on a real pretrained encoder: test accuracy against attention density for
dense attention, learned masks (DAM_s, DAM_u: search, then fine-tune with the fixed mask) and
random masks of the same densities, over several seeds.

    python -m zoo.studies.sparse_attention                       # the whole study (2 cores: ~2 h)
    python -m zoo.studies.sparse_attention --seeds 0 1 2 --lambdas 0.01 0.1 \\
        -- trainer=gpu hydra/launcher=joblib hydra.launcher.n_jobs=4   # overrides for every job
    python -m zoo.studies.sparse_attention --collect-only        # summarise the runs so far

Stages, each one ``train.py`` multirun (so Hydra's launchers apply, and every job is an ordinary
zoo run in the mlflow experiment ``--experiment``, by default named after the study, tagged
``zoo.tag.study=<study>``):

1. ``dense``: ``experiment=sparsebert_minilm_dense`` for every seed;
2. ``search``: ``experiment=sparsebert_minilm_search`` for every mask mode and λ (seed
   ``--search-seed``);
3. ``finetune``: ``experiment=sparsebert_minilm_finetune`` from every search run's mask, for
   every seed;
4. ``random``: ``experiment=sparsebert_minilm_random`` at every search run's mask density, for
   every seed.

A stage runs only the jobs that have no FINISHED run in the study yet (``--rerun``: all of
them), and reads the runs of the earlier stages from mlflow, so a study that was interrupted —
a killed job, a lost machine — goes on where it stopped when run again.

The summary — a table, the accuracy-vs-density plots, the search runs' mask heatmaps — is
written to ``--out`` and logged to the study's summary run (tag ``zoo.kind=study``; one per
study, updated by every summary) whose description is the table: the mlflow UI shows it next
to the runs it summarises. Densities are given twice: over the mask's whole L × L square (what
the search penalises) and over the pairs of real tokens of the test split (padding left out),
since a learned mask can drop the corner that only padding fills, which a random one cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from zoo.studies.common import REPO, StudyError, multirun, summary_run
from zoo.tracking import global_tracking_uri

STAGES = ("dense", "search", "finetune", "random")
EXPERIMENTS = {
    "dense": "sparsebert_minilm_dense",
    "search": "sparsebert_minilm_search",
    "finetune": "sparsebert_minilm_finetune",
    "random": "sparsebert_minilm_random",
}
METHODS = ("dense", "dam_s", "dam_u", "random")  # table order


@dataclass(frozen=True)
class Row:
    """One finished run of the study, as the table counts it."""

    method: str  # dense | dam_s | dam_u | random | search:dam_s | search:dam_u
    lam: float | None  # λ of the search (its fine-tunes' too)
    density: float  # share of attention positions kept (val/mask_density)
    seed: int
    acc: float  # test/acc
    f1: float  # test/f1_macro
    run_id: str
    search_run: str | None = None  # the search a fine-tune's mask comes from
    token_density: float | None = None  # share kept among the pairs of real tokens (test split)


# --------------------------------------------------------------------------- running


def finished_jobs(client, experiment_id: str | None, study: str, stage: str) -> set[tuple]:
    """The jobs of ``stage`` that already have a FINISHED run in the study, as the keys
    ``run_stage`` sweeps over: dense ``(seed,)``; search ``(seed, mode, λ)``; finetune
    ``(seed, search run id)``; random ``(seed, density)``."""
    if experiment_id is None:
        return set()
    runs = client.search_runs(
        [experiment_id],
        "attributes.status = 'FINISHED' and tags.`zoo.kind` = 'train' "
        f"and tags.`zoo.tag.study` = '{study}' "
        f"and tags.`zoo.experiment` = '{EXPERIMENTS[stage]}'",
        max_results=5000,
    )
    done = set()
    for r in runs:
        p = r.data.params
        seed = int(p.get("seed", 0))
        if stage == "dense":
            done.add((seed,))
        elif stage == "search":
            done.add((seed, p.get("model.mask.mode"), float(p["model.mask.lambda_sparsity"])))
        elif stage == "finetune":
            done.add((seed, p.get("model.mask.from_run")))
        else:
            done.add((seed, round(float(p["model.mask.density"]), 6)))
    return done


def run_stage(stage: str, args, client, experiment_id: str | None, env) -> None:
    """Run the stage's jobs that have no FINISHED run yet (all of them with ``--rerun``):
    one multirun per seed (per seed and mode for the search) over the missing values."""
    common = [
        f"experiment={EXPERIMENTS[stage]}",
        f"tracking.experiment_name={args.experiment}",
        f"++tags.study={args.study}",
        *args.overrides,
    ]
    done = set() if args.rerun else finished_jobs(client, experiment_id, args.study, stage)
    jobs: dict[tuple[str, ...], list[str]] = {}  # fixed overrides -> the swept values
    if stage == "dense":
        todo = [s for s in args.seeds if (s,) not in done]
        if todo:
            jobs[()] = ["seed=" + ",".join(str(s) for s in todo)]
    elif stage == "search":
        for mode in args.modes:
            todo = [x for x in args.lambdas if (args.search_seed, mode, float(x)) not in done]
            if todo:
                fixed = (f"seed={args.search_seed}", f"model.mask.mode={mode}")
                jobs[fixed] = ["model.mask.lambda_sparsity=" + ",".join(str(x) for x in todo)]
    else:
        rows = collect(client, experiment_id, args.study)
        searches = [r for r in rows if r.method.startswith("search:")]
        if not searches:
            raise StudyError(
                f"stage {stage} needs the study's search runs, and experiment "
                f"{args.experiment!r} has no finished one of study {args.study!r}: run "
                "--stages search first"
            )
        for seed in args.seeds:
            if stage == "finetune":
                todo = [r.run_id for r in searches if (seed, r.run_id) not in done]
                key = "model.mask.from_run"
            else:  # random masks at the densities the searches reached
                densities = sorted({round(r.density, 6) for r in searches})
                todo = [str(d) for d in densities if (seed, d) not in done]
                key = "model.mask.density"
            if todo:
                jobs[(f"seed={seed}",)] = [f"{key}=" + ",".join(todo)]
    skipped = len(done)
    if skipped:
        print(f"stage {stage}: {skipped} job(s) already finished, skipped", flush=True)
    for fixed, sweep in jobs.items():
        multirun([*common, *fixed, *sweep], args.train_script, env)


# --------------------------------------------------------------------------- collecting


def collect(client, experiment_id: str | None, study: str) -> list[Row]:
    """The study's finished runs as rows; a job run twice (a rerun stage) counts once, newest."""
    if experiment_id is None:
        return []
    runs = client.search_runs(
        [experiment_id],
        "attributes.status = 'FINISHED' and tags.`zoo.kind` = 'train' "
        f"and tags.`zoo.tag.study` = '{study}'",
        max_results=5000,
        order_by=["attributes.start_time DESC"],
    )
    searches = {}
    for r in runs:
        if r.data.params.get("model.mask.mode") in ("dam_s", "dam_u"):
            searches[r.info.run_id] = r
    rows, seen = [], set()
    for r in runs:
        p, m = r.data.params, r.data.metrics
        if "test/acc" not in m or "val/mask_density" not in m:
            continue
        mode, lam, source = p.get("model.mask.mode"), None, None
        if mode == "dense":
            method = "dense"
        elif mode in ("dam_s", "dam_u"):
            method, lam = f"search:{mode}", float(p["model.mask.lambda_sparsity"])
        elif mode == "fixed" and p.get("model.mask.from_run") in searches:
            source = p["model.mask.from_run"]
            search = searches[source].data.params
            method, lam = search["model.mask.mode"], float(search["model.mask.lambda_sparsity"])
        elif mode == "random":
            method = "random"
        else:
            continue  # a fixed mask from outside the study
        seed = int(p.get("seed", 0))
        key = (method, lam, source, p.get("model.mask.density"), seed)
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            Row(
                method=method,
                lam=lam,
                density=float(m["val/mask_density"]),
                seed=seed,
                acc=float(m["test/acc"]),
                f1=float(m.get("test/f1_macro", float("nan"))),
                run_id=r.info.run_id,
                search_run=source,
            )
        )
    return rows


def token_density(mask, lengths: list[int]) -> float:
    """The share of attention positions a mask keeps among those a sequence really has (its
    tokens × its tokens, padding left out), averaged over heads, layers and sequences. A
    density over the whole L × L square counts positions that short sequences never use, so a
    mask that drops the padded corner looks sparser than it is on the text."""
    import torch

    kept = mask.float().mean(dim=tuple(range(mask.dim() - 2)))  # [L, L] over layers, heads
    prefix = kept.cumsum(0).cumsum(1)  # prefix[n-1, n-1] = kept positions among the first n
    n = torch.as_tensor(lengths, dtype=torch.long).clamp(1, kept.shape[-1])
    return float((prefix[n - 1, n - 1] / (n * n)).mean())


def tested_lengths(run_id: str, uri: str) -> list[int] | None:
    """Token counts of the test split a run was tested on (its logged data config, rebuilt);
    None, with a note, where the data cannot be rebuilt here."""
    from zoo import legacy, tracking
    from zoo.pipeline import build

    try:
        cfg = legacy.upgrade(tracking.load_run_config(run_id, uri))
        data = build(cfg.data, "data")
        data.prepare_data()
        data.setup("test")
        return [int(n) for b in data.test_dataloader() for n in b["attention_mask"].sum(1)]
    except Exception as exc:  # the summary still stands on the L × L densities
        print(f"note: no density on tokens ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


@dataclass
class Group:
    method: str
    lam: float | None
    density: float
    accs: list[float]
    f1s: list[float]
    seeds: list[int]
    token_density: float | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.accs))

    @property
    def std(self) -> float:
        return float(np.std(self.accs, ddof=1)) if len(self.accs) > 1 else 0.0


def groups(rows: list[Row]) -> list[Group]:
    """Rows of one method and λ (learned masks) or density (random) pooled over seeds."""
    pooled: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        key = (r.method, r.lam, round(r.density, 4) if r.method == "random" else None)
        pooled[key].append(r)
    out = []
    for (method, lam, _), rs in pooled.items():
        rs = sorted(rs, key=lambda r: r.seed)
        out.append(
            Group(
                method,
                lam,
                float(np.mean([r.density for r in rs])),
                [r.acc for r in rs],
                [r.f1 for r in rs],
                [r.seed for r in rs],
                None
                if any(r.token_density is None for r in rs)
                else float(np.mean([r.token_density for r in rs])),
            )
        )
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda g: (order.get(g.method, len(order)), g.method, -g.density))


def table(gs: list[Group]) -> str:
    """A Markdown table: one row per method and λ / density."""
    lines = [
        "| method | λ | density | density on tokens | test acc (mean ± sd) | per seed | "
        "test macro-F1 | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in gs:
        lam = "" if g.lam is None else f"{g.lam:g}"
        acc = f"{g.mean:.4f} ± {g.std:.4f}" if len(g.accs) > 1 else f"{g.mean:.4f} (one seed)"
        tokens = "" if g.token_density is None else f"{g.token_density:.1%}"
        name = {"search:dam_s": "DAM_s search", "search:dam_u": "DAM_u search"}.get(
            g.method,
            g.method if g.method in ("dense", "random") else g.method.replace("dam", "DAM"),
        )
        lines.append(
            f"| {name} | {lam} | {g.density:.1%} | {tokens} | {acc} | "
            f"{', '.join(f'{a:.4f}' for a in g.accs)} | {float(np.mean(g.f1s)):.4f} | "
            f"{', '.join(map(str, g.seeds))} |"
        )
    return "\n".join(lines)


def summarise(client, experiment_id: str | None, study: str, out: Path, uri: str) -> Path:
    """Write the table, the plot and the mask heatmaps to ``out`` and log them as the study's
    summary run. Returns the table's path."""
    import mlflow
    import torch

    from zoo.models.sparsebert import MASK_ARTIFACT
    from zoo.plotting import close, density_accuracy_figure, mask_heatmaps_figure

    rows = collect(client, experiment_id, study)
    if not rows:
        raise StudyError(f"{uri} has no finished run of study {study!r} yet")
    masks = {}
    for r in rows:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(r.run_id, MASK_ARTIFACT, tmp)
            masks[r.run_id] = torch.load(path, map_location="cpu", weights_only=True)["mask"]
    lengths = tested_lengths(rows[0].run_id, uri)
    if lengths is not None:
        rows = [replace(r, token_density=token_density(masks[r.run_id], lengths)) for r in rows]
    gs = groups(rows)
    out.mkdir(parents=True, exist_ok=True)
    text = table(gs)
    (out / "study.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    figures = {"accuracy_vs_density.png": density_accuracy_figure(rows)}
    if lengths is not None:
        figures["accuracy_vs_token_density.png"] = density_accuracy_figure(rows, x="token_density")
    for r in rows:
        if r.method.startswith("search:"):
            mask = masks[r.run_id]
            mode = r.method.split(":")[1]
            title = f"{mode} search, λ={r.lam:g}: {r.density:.1%} of positions kept"
            figures[f"masks_{mode}_lambda{r.lam:g}.png"] = mask_heatmaps_figure(
                mask.float().numpy(), title
            )
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=100)
        close(fig)
    # one summary run per study, brought up to date by every summary
    tags = {
        "zoo.study.runs": str(len(rows)),
        "mlflow.note.content": f"Test accuracy against attention density.\n\n{text}",
    }
    with (
        global_tracking_uri(uri),
        mlflow.start_run(
            run_id=summary_run(client, experiment_id, study, f"{study}-summary", tags)
        ),
    ):
        mlflow.log_artifacts(str(out), "study")
        for g in gs:
            key = g.method.replace(":", "_") + (
                f"_lambda{g.lam:g}" if g.lam is not None else f"_density{g.density:.3f}"
            )
            mlflow.log_metric(
                f"acc_mean/{key}" if g.method != "dense" else "acc_mean/dense", g.mean
            )
    print(text)
    print(f"\nwritten to {out} and logged as the run {study}-summary ({uri})")
    return out / "study.md"


# --------------------------------------------------------------------------- command line


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zoo.studies.sparse_attention",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--study", default="sparsebert-density", help="tag zoo.tag.study")
    parser.add_argument("--experiment", help="the runs' mlflow experiment (default: the study)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument(
        "--modes", nargs="+", default=["dam_s", "dam_u"], choices=["dam_s", "dam_u"]
    )
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--collect-only", action="store_true", help="only summarise")
    parser.add_argument(
        "--rerun", action="store_true", help="run every job, even those already FINISHED"
    )
    parser.add_argument("--out", type=Path, default=None, help="default logs/studies/<study>")
    parser.add_argument("--train-script", type=Path, default=REPO / "train.py")
    parser.add_argument("overrides", nargs="*", help="after --: overrides for every train.py job")
    args = parser.parse_args(argv)
    args.experiment = args.experiment or args.study
    if args.out is None:
        args.out = Path("logs") / "studies" / args.study
    if not args.collect_only and not args.train_script.is_file():
        parser.error(
            f"--train-script {args.train_script}: no such file (a zoo checkout's train.py)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # many small files
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    client = MlflowClient(uri)

    def experiment_id() -> str | None:
        exp = client.get_experiment_by_name(args.experiment)
        return exp.experiment_id if exp else None

    try:
        if not args.collect_only:
            for stage in STAGES:
                if stage in args.stages:
                    print(f"\n== stage {stage} ==", flush=True)
                    run_stage(stage, args, client, experiment_id(), env)
        summarise(client, experiment_id(), args.study, args.out, uri)
    except StudyError as err:
        print(f"study error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
