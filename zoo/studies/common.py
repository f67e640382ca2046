"""What every study shares: its jobs are ``train.py`` multiruns (so Hydra's launchers
parallelise them), its runs are found in mlflow by tag, and its summary lives in one run of
kind ``study`` that a rerun brings up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TAG_STUDY = "zoo.tag.study"  # what ``++tags.study=<name>`` gives every job of a study


class StudyError(Exception):
    """A stage failed or the study has nothing to summarise (one paragraph, exit 1)."""


def multirun(overrides: list[str], train_script: Path, env: dict[str, str], check: bool = True):
    """``train.py -m <overrides>``; its exit status (a failure raises StudyError with ``check``)."""
    cmd = [sys.executable, str(train_script), "-m", *overrides]
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, env=env).returncode
    if check and code != 0:
        raise StudyError(f"this multirun failed: {' '.join(overrides)} (its jobs' logs say why)")
    return code


def study_runs(client, experiment_id: str | None, study: str, where: str = "", **kwargs):
    """The training runs of ``study`` (newest first), optionally filtered further."""
    if experiment_id is None:
        return []
    query = f"tags.`zoo.kind` = 'train' and tags.`{TAG_STUDY}` = '{study}'"
    return client.search_runs(
        [experiment_id],
        f"{query} and {where}" if where else query,
        max_results=5000,
        order_by=["attributes.start_time DESC"],
        **kwargs,
    )


def summary_run(client, experiment_id: str, study: str, run_name: str, tags: dict[str, str]):
    """The study's one summary run (tag ``zoo.kind=study``), created on first use; returns its
    id. Later summaries of the same study update it."""
    previous = client.search_runs(
        [experiment_id],
        f"tags.`zoo.kind` = 'study' and tags.`{TAG_STUDY}` = '{study}'",
        order_by=["attributes.start_time ASC"],
    )
    if previous:
        run_id = previous[0].info.run_id
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        return run_id
    run = client.create_run(
        experiment_id, run_name=run_name, tags={"zoo.kind": "study", TAG_STUDY: study, **tags}
    )
    return run.info.run_id


def mean_sd_ci(values: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation and the two-sided Student-t interval of the mean."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "n": n}
