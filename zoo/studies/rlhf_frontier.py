"""RLHF's reward–KL frontier: PPO at several KL coefficients (``model.kl_coef``), over several
seeds; how much reward each buys and how far from the reference policy it goes.

    python -m zoo.studies.rlhf_frontier --kl-coefs 0.01 0.05 0.2 --seeds 0 1 2
    python -m zoo.studies.rlhf_frontier --reward-run <stage-1 run id>     # no stage 1
    python -m zoo.studies.rlhf_frontier --ppo-experiment rlhf_ppo_tiny_demo \\
        --kl-coefs 0.01 0.5 --seeds 0 1 -- debug=fast                     # overrides, every job
    python -m zoo.studies.rlhf_frontier --collect-only                    # summarise the runs

Jobs, each stage one ``train.py -m`` multirun (so Hydra's launchers apply, and every job is an
ordinary zoo run in the mlflow experiment ``--experiment-name``, by default named after the
study, tagged ``zoo.tag.study=<study>``):

1. ``reward`` (only when the PPO experiment's reward is a stage-1 run and ``--reward-run`` is
   not given, as for ``rlhf_ppo_demo``): ``experiment=rlhf_reward_demo`` once; a rerun finds
   its FINISHED run by the study's tag and trains it no more;
2. ``ppo``: ``--ppo-experiment`` (default ``rlhf_ppo_demo``) for every KL coefficient and seed,
   with ``model.reward.from_run`` set to stage 1's run (or ``--reward-run``). An experiment
   with its own reward (``rlhf_ppo_tiny_demo``: the programmatic
   ``zoo.models.rlhf.finished_sentence``) has no stage 1.

A stage runs only the jobs that have no FINISHED run in the study yet (``--rerun``: all of
them), so a study that was interrupted goes on where it stopped when run again. The overrides
after ``--`` reach every job, stage 1's too; for a stage 1 of other settings, train it yourself
and give ``--reward-run``.

The summary — per KL coefficient, test/score, test/kl, test/rlhf_reward and test/win_rate as
mean ± sd over the seeds (the newest FINISHED run of each coefficient and seed), and the
frontier figure (mean test/score against mean test/kl, ± sd, every run a faint dot, the
reference policy's test/reference_score as a dashed line) — is written to ``--out`` and
logged to the study's summary run (tag ``zoo.kind=study``; one per study, updated by every
summary), whose description is the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from zoo.studies.common import REPO, TAG_STUDY, StudyError, mean_sd_ci, multirun, summary_run

DEFAULT_KL_COEFS = (0.01, 0.05, 0.2)
DEFAULT_SEEDS = (0, 1, 2)
PPO_TARGET = "zoo.models.rlhf.PPOPolicy"
METRICS = {  # test metric -> the Row field and the table's column
    "test/score": ("score", "test/score"),
    "test/kl": ("kl", "test/kl"),
    "test/rlhf_reward": ("rlhf_reward", "test/rlhf_reward"),
    "test/win_rate": ("win_rate", "test/win_rate"),
}
TAG_OVERRIDES = "zoo.study.overrides"
# overrides the study sets itself, and the option that chooses them
OWN_KEYS = {
    "experiment": "--ppo-experiment",
    "model.kl_coef": "--kl-coefs",
    "seed": "--seeds",
    "tracking.experiment_name": "--experiment-name",
}


@dataclass(frozen=True)
class Row:
    """One finished PPO run of the study, as the table counts it."""

    kl_coef: float  # model.kl_coef
    seed: int
    score: float  # test/score
    kl: float  # test/kl
    rlhf_reward: float  # test/rlhf_reward
    win_rate: float  # test/win_rate
    reference_score: float  # test/reference_score
    run_id: str
    reward: str  # where the reward came from: "run <id>", a file, a callable


def _coef(value) -> float:
    """A KL coefficient as a key: the float a param string or an argument gives, rounded."""
    return round(float(value), 9)


# --------------------------------------------------------------------------- checking


def ppo_experiments() -> list[str]:
    """The experiments in conf/ whose model is PPO (``rlhf_ppo`` among their defaults, or an
    experiment that has it)."""
    import yaml

    folder = REPO / "conf" / "experiment"
    parents: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.yaml")):
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
        parents[path.stem] = [
            str(v) for d in defaults for v in (d.values() if isinstance(d, dict) else [d])
        ]

    def ppo(name: str, depth: int = 0) -> bool:
        own = parents.get(name, [])
        return "rlhf_ppo" in own or (depth < 8 and any(ppo(p, depth + 1) for p in own))

    return [name for name in parents if ppo(name)]


def check_arguments(args) -> None:
    """Refuse what cannot make a frontier, before anything runs (one paragraph each)."""
    if not args.kl_coefs:
        raise StudyError(
            "--kl-coefs: no KL coefficient given; the frontier needs at least one value of "
            "model.kl_coef (for example --kl-coefs 0.01 0.05 0.2)"
        )
    bad = [k for k in args.kl_coefs if not math.isfinite(k) or k < 0]
    if bad:
        raise StudyError(
            f"--kl-coefs {' '.join(f'{k:g}' for k in bad)}: a KL coefficient weighs the penalty "
            "on the KL to the reference policy, so it is a finite number of 0 or more (0: no "
            "penalty); give values such as 0.01 0.05 0.2"
        )
    if not args.seeds:
        raise StudyError("--seeds: no seed given; give at least one (for example --seeds 0 1 2)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.study):
        raise StudyError(
            f"--study {args.study!r}: a study's name is its runs' tag zoo.tag.study; use "
            "letters, digits, '_', '.' and '-'"
        )
    for o in args.overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in OWN_KEYS:
            raise StudyError(
                f"{o}: the study sets {key} for every job; choose it with {OWN_KEYS[key]}"
            )
        if args.reward_run and key.startswith("model.reward"):
            raise StudyError(
                f"{o}: --reward-run {args.reward_run} gives the reward; leave out the override "
                "or the option"
            )


def compose_ppo(args):
    """The PPO experiment's config with the overrides (Hydra's own left out); a name that is
    no experiment, or one that is not PPO, is a StudyError naming the PPO experiments."""
    from zoo.errors import one_line
    from zoo.studies.cv import compose

    known = ppo_experiments()
    if not (REPO / "conf" / "experiment" / f"{args.ppo_experiment}.yaml").is_file():
        raise StudyError(
            f"--ppo-experiment {args.ppo_experiment}: there is no such experiment in "
            f"{REPO / 'conf' / 'experiment'}; the PPO experiments are {', '.join(known)}"
        )
    try:
        cfg = compose([f"experiment={args.ppo_experiment}", *args.overrides])
    except Exception as exc:  # Hydra's override grammar, an unknown key or option
        raise StudyError(
            f"the overrides {' '.join(args.overrides) or '(none)'} do not compose with "
            f"experiment={args.ppo_experiment}: {one_line(str(exc))}"
        ) from None
    target = str(cfg.model.get("_target_"))
    if target != PPO_TARGET:
        raise StudyError(
            f"--ppo-experiment {args.ppo_experiment}: its model is {target}, not PPO "
            f"({PPO_TARGET}), so it has no model.kl_coef to sweep; the PPO experiments are "
            f"{', '.join(known)}"
        )
    return cfg


def needs_reward_stage(cfg, args) -> bool:
    """Whether the PPO jobs wait for a stage-1 reward model the study trains itself: the
    experiment names no reward (``model.reward`` all null) and ``--reward-run`` is not given."""
    if args.reward_run:
        return False
    reward = cfg.model.get("reward") or {}
    return not any(reward.get(k) for k in ("from_run", "file", "callable"))


# --------------------------------------------------------------------------- running


def _runs(client, experiment_id: str | None, study: str, experiment: str, finished=True):
    """The study's training runs of ``experiment`` (its config's name), newest first."""
    if experiment_id is None:
        return []
    query = (
        f"tags.`zoo.kind` = 'train' and tags.`{TAG_STUDY}` = '{study}' "
        f"and tags.`zoo.experiment` = '{experiment}'"
    )
    if finished:
        query = f"attributes.status = 'FINISHED' and {query}"
    return client.search_runs(
        [experiment_id], query, max_results=5000, order_by=["attributes.start_time DESC"]
    )


def reward_stage(args, client, experiment_id: str | None, env) -> str:
    """Stage 1's run id: the study's newest FINISHED run of ``--reward-experiment``, trained
    first when there is none (or with ``--rerun``)."""
    runs = [] if args.rerun else _runs(client, experiment_id, args.study, args.reward_experiment)
    if runs:
        print(f"stage reward: run {runs[0].info.run_id} already finished, used", flush=True)
        return runs[0].info.run_id
    overrides = [
        f"experiment={args.reward_experiment}",
        f"tracking.experiment_name={args.experiment_name}",
        f"++tags.study={args.study}",
        *args.overrides,
    ]
    multirun(overrides, args.train_script, env)
    exp = client.get_experiment_by_name(args.experiment_name)
    runs = _runs(client, exp.experiment_id if exp else None, args.study, args.reward_experiment)
    if not runs:
        raise StudyError(
            f"stage reward: experiment={args.reward_experiment} ran but left no FINISHED run "
            f"of study {args.study!r} in {args.experiment_name!r} (its job's log says why)"
        )
    return runs[0].info.run_id


def reward_of(params: dict[str, str]) -> str:
    """Where a PPO run's reward came from, from its logged params."""
    for key, what in (("from_run", "run "), ("file", "file "), ("callable", "")):
        value = params.get(f"model.reward.{key}")
        if value and value != "None":
            return f"{what}{value}"
    return "unknown"


def finished_jobs(client, experiment_id, args, reward_run: str | None) -> set[tuple[float, int]]:
    """The (kl_coef, seed) jobs that already have a FINISHED run in the study (with the same
    stage-1 run as reward, when there is one)."""
    done = set()
    for r in _runs(client, experiment_id, args.study, args.ppo_experiment):
        p = r.data.params
        if reward_run and p.get("model.reward.from_run") != reward_run:
            continue
        done.add((_coef(p["model.kl_coef"]), int(p.get("seed", 0))))
    return done


def plan_jobs(kl_coefs, seeds, done) -> list[tuple[list[float], list[int]]]:
    """The missing jobs as multiruns: seeds that miss the same coefficients share one
    (``model.kl_coef=a,b seed=0,1``), so a fresh study is a single multirun."""
    by_coefs: dict[tuple[float, ...], list[int]] = {}
    for seed in seeds:
        todo = tuple(k for k in kl_coefs if (_coef(k), seed) not in done)
        if todo:
            by_coefs.setdefault(todo, []).append(seed)
    return [(list(coefs), seeds_) for coefs, seeds_ in by_coefs.items()]


def run_ppo(args, client, experiment_id, env, reward_run: str | None) -> int:
    """Run the PPO jobs without a FINISHED run (all of them with ``--rerun``); returns the
    number of multiruns that failed (the summary then names the missing jobs)."""
    done = set() if args.rerun else finished_jobs(client, experiment_id, args, reward_run)
    skipped = sum((_coef(k), s) in done for k in args.kl_coefs for s in args.seeds)
    if skipped:
        print(f"stage ppo: {skipped} job(s) already finished, skipped", flush=True)
    common = [
        f"experiment={args.ppo_experiment}",
        f"tracking.experiment_name={args.experiment_name}",
        f"++tags.study={args.study}",
    ]
    if reward_run:
        common += [
            f"model.reward.from_run={reward_run}",
            "model.reward.file=null",
            "model.reward.callable=null",
        ]
    failed = 0
    for coefs, seeds in plan_jobs(args.kl_coefs, args.seeds, done):
        sweep = [
            "model.kl_coef=" + ",".join(repr(float(k)) for k in coefs),
            "seed=" + ",".join(str(s) for s in seeds),
        ]
        failed += multirun([*common, *args.overrides, *sweep], args.train_script, env, False) != 0
    return failed


# --------------------------------------------------------------------------- collecting


def collect(client, experiment_id: str | None, study: str, ppo_experiment: str) -> list[Row]:
    """The study's finished PPO runs as rows; a job run twice counts once, its newest run."""
    rows, seen = [], set()
    for r in _runs(client, experiment_id, study, ppo_experiment):
        p, m = r.data.params, r.data.metrics
        if not all(k in m for k in METRICS) or "model.kl_coef" not in p:
            continue
        key = (_coef(p["model.kl_coef"]), int(p.get("seed", 0)))
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            Row(
                kl_coef=key[0],
                seed=key[1],
                score=float(m["test/score"]),
                kl=float(m["test/kl"]),
                rlhf_reward=float(m["test/rlhf_reward"]),
                win_rate=float(m["test/win_rate"]),
                reference_score=float(m.get("test/reference_score", float("nan"))),
                run_id=r.info.run_id,
                reward=reward_of(p),
            )
        )
    return sorted(rows, key=lambda r: (r.kl_coef, r.seed))


def groups(rows: list[Row]) -> list[dict]:
    """Per KL coefficient: the seeds, the runs, and mean_sd_ci of every table metric."""
    pooled: dict[float, list[Row]] = {}
    for r in rows:
        pooled.setdefault(r.kl_coef, []).append(r)
    out = []
    for coef in sorted(pooled):
        rs = sorted(pooled[coef], key=lambda r: r.seed)
        stats = {m: mean_sd_ci([getattr(r, f) for r in rs]) for m, (f, _) in METRICS.items()}
        out.append(
            {
                "kl_coef": coef,
                "seeds": [r.seed for r in rs],
                "run_ids": [r.run_id for r in rs],
                "stats": stats,
            }
        )
    return out


def reference_score(rows: list[Row]) -> float | None:
    """The reference policy's test score, averaged over the runs that logged it."""
    values = [r.reference_score for r in rows if math.isfinite(r.reference_score)]
    return sum(values) / len(values) if values else None


def table(gs: list[dict], reference: float | None = None, missing=()) -> str:
    """The Markdown table: one row per KL coefficient, mean ± sd over the seeds."""
    lines = [
        "| kl_coef | "
        + " | ".join(f"{col} (mean ± sd)" for _, col in METRICS.values())
        + " | seeds |",
        "|---|" + "---|" * len(METRICS) + "---|",
    ]
    for g in gs:
        cells = []
        for m in METRICS:
            s = g["stats"][m]
            cells.append(
                f"{s['mean']:.4f} ± {s['sd']:.4f}" if s["n"] > 1 else f"{s['mean']:.4f} (one seed)"
            )
        seeds = ", ".join(map(str, g["seeds"]))
        lines.append(f"| {g['kl_coef']:g} | {' | '.join(cells)} | {seeds} |")
    if reference is not None:
        lines += ["", f"Reference policy (before PPO): test/reference_score {reference:.4f}."]
    if missing:
        jobs = ", ".join(f"kl_coef={k:g} seed={s}" for k, s in missing)
        lines += ["", f"Jobs without a finished run: {jobs}."]
    return "\n".join(lines)


def summarise(client, experiment_id, args, uri: str, missing=()) -> str:
    """Write the table (Markdown, JSON) and the frontier figure to ``--out`` and log them to
    the study's summary run, whose description is the table. Returns the table."""
    from mlflow.entities import Metric

    from zoo.plotting import close, reward_kl_frontier_figure

    rows = collect(client, experiment_id, args.study, args.ppo_experiment)
    if not rows:
        raise StudyError(
            f"{uri} has no finished {args.ppo_experiment} run of study {args.study!r} in the "
            f"mlflow experiment {args.experiment_name!r} yet"
        )
    gs = groups(rows)
    reference = reference_score(rows)
    text = table(gs, reference, missing)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.md").write_text(text + "\n")
    rewards = sorted({r.reward for r in rows})
    summary = {
        "study": args.study,
        "ppo_experiment": args.ppo_experiment,
        "rewards": rewards,
        "reference_score": reference,
        "kl_coefs": gs,
        "runs": [asdict(r) for r in rows],
        "missing": [{"kl_coef": k, "seed": s} for k, s in missing],
    }
    (out / "frontier.json").write_text(json.dumps(summary, indent=1))
    fig = reward_kl_frontier_figure(rows, reference)
    fig.savefig(out / "frontier.png", dpi=100)
    close(fig)

    tags = {
        "zoo.study.type": "rlhf_frontier",
        "zoo.study.runs": str(len(rows)),
        "mlflow.note.content": (
            f"Reward–KL frontier of {args.ppo_experiment} over model.kl_coef (reward: "
            f"{'; '.join(rewards)}).\n\n{text}"
        ),
    }
    if not args.collect_only:
        tags[TAG_OVERRIDES] = " ".join(args.overrides)
    run_id = summary_run(client, experiment_id, args.study, f"{args.study}-summary", tags)
    client.log_artifacts(run_id, str(out), "study")
    now = int(time.time() * 1000)
    metrics = []
    for g in gs:
        for m, (field, _) in METRICS.items():
            for stat in ("mean", "sd"):
                value = g["stats"][m][stat]
                if math.isfinite(value):
                    name = f"kl_coef_{g['kl_coef']:g}/{field}_{stat}"
                    metrics.append(Metric(name, float(value), now, 0))
    if reference is not None:
        metrics.append(Metric("reference_score", float(reference), now, 0))
    client.log_batch(run_id, metrics=metrics)
    if missing:
        client.set_tag(run_id, "zoo.failure", f"{len(missing)} job(s) without a finished run")
    client.set_terminated(run_id, "FAILED" if missing else "FINISHED")
    print(text)
    if len(rewards) > 1:
        print(f"note: the runs were trained against different rewards: {rewards}", file=sys.stderr)
    print(f"\nwritten to {out} and logged as the run {args.study}-summary ({uri})")
    return text


# --------------------------------------------------------------------------- command line


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zoo.studies.rlhf_frontier",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--kl-coefs",
        type=float,
        nargs="*",
        default=None,
        help=f"model.kl_coef values (default {' '.join(map(str, DEFAULT_KL_COEFS))})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=None,
        help=f"seeds of every coefficient (default {' '.join(map(str, DEFAULT_SEEDS))})",
    )
    parser.add_argument("--ppo-experiment", default="rlhf_ppo_demo", help="the PPO experiment")
    parser.add_argument(
        "--reward-run", help="a stage-1 run id as every job's reward (no stage 1 is trained)"
    )
    parser.add_argument(
        "--reward-experiment", default="rlhf_reward_demo", help="stage 1, when it is needed"
    )
    parser.add_argument("--study", help="tag zoo.tag.study (default frontier-<ppo experiment>)")
    parser.add_argument(
        "--experiment-name", help="the runs' mlflow experiment (default: the study)"
    )
    parser.add_argument("--collect-only", action="store_true", help="only summarise")
    parser.add_argument(
        "--rerun", action="store_true", help="run every job, even those already FINISHED"
    )
    parser.add_argument("--out", type=Path, default=None, help="default logs/studies/<study>")
    parser.add_argument("--train-script", type=Path, default=REPO / "train.py")
    parser.add_argument("overrides", nargs="*", help="after --: overrides for every train.py job")
    args = parser.parse_args(argv)
    args.grid_given = args.kl_coefs is not None or args.seeds is not None
    if args.kl_coefs is None:
        args.kl_coefs = list(DEFAULT_KL_COEFS)
    if args.seeds is None:
        args.seeds = list(DEFAULT_SEEDS)
    args.kl_coefs = list(dict.fromkeys(args.kl_coefs))  # once each, in the order given
    args.seeds = list(dict.fromkeys(args.seeds))
    args.study = args.study or f"frontier-{args.ppo_experiment}"
    args.experiment_name = args.experiment_name or args.study
    if args.out is None:
        args.out = Path("logs") / "studies" / args.study
    if not args.collect_only and not args.train_script.is_file():
        parser.error(
            f"--train-script {args.train_script}: no such file (a zoo checkout's train.py)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from omegaconf import OmegaConf

        from zoo import tracking
        from zoo.errors import ZooError

        check_arguments(args)
        cfg = compose_ppo(args)
        try:
            uri = tracking.open_store(OmegaConf.select(cfg, "tracking.tracking_uri"))
        except ZooError as err:
            raise StudyError(str(err)) from None
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        client = tracking.client(uri)

        def experiment_id() -> str | None:
            exp = client.get_experiment_by_name(args.experiment_name)
            return exp.experiment_id if exp else None

        if args.reward_run:
            from mlflow.exceptions import MlflowException

            try:
                client.get_run(args.reward_run)
            except MlflowException:
                raise StudyError(
                    f"--reward-run {args.reward_run}: {uri} has no such run (a stage-1 run "
                    f"of {args.reward_experiment})"
                ) from None
        failed = 0
        if not args.collect_only:
            warn_other_overrides(client, experiment_id(), args)
            reward_run = args.reward_run
            if needs_reward_stage(cfg, args):
                print("\n== stage reward ==", flush=True)
                reward_run = reward_stage(args, client, experiment_id(), env)
            print("\n== stage ppo ==", flush=True)
            failed = run_ppo(args, client, experiment_id(), env, reward_run)
        missing = []
        if args.grid_given or not args.collect_only:
            found = {
                (r.kl_coef, r.seed)
                for r in collect(client, experiment_id(), args.study, args.ppo_experiment)
            }
            missing = [
                (_coef(k), s)
                for k in args.kl_coefs
                for s in args.seeds
                if (_coef(k), s) not in found
            ]
        summarise(client, experiment_id(), args, uri, missing)
    except StudyError as err:
        print(f"study error: {err}", file=sys.stderr)
        return 1
    if missing or failed:
        print(
            f"{len(missing)} job(s) without a finished run: run the same command again to run "
            "only those",
            file=sys.stderr,
        )
        return 1
    return 0


def warn_other_overrides(client, experiment_id: str | None, args) -> None:
    """A study continued with other overrides mixes settings in one table: say so."""
    if experiment_id is None:
        return
    previous = client.search_runs(
        [experiment_id],
        f"tags.`zoo.kind` = 'study' and tags.`{TAG_STUDY}` = '{args.study}'",
        order_by=["attributes.start_time ASC"],
    )
    if not previous or TAG_OVERRIDES not in previous[0].data.tags:
        return
    theirs, mine = previous[0].data.tags[TAG_OVERRIDES], " ".join(args.overrides)
    if theirs != mine:
        print(
            f"warning: study {args.study!r} ran its jobs with the overrides '{theirs}'; the jobs "
            f"run now get '{mine}' and the finished ones are kept (give a study of other "
            "settings its own --study name, or --rerun)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
