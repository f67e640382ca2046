"""DEAP at full size: memory, data setup time and throughput of the cached, memory-mapped loader.

    python benchmarks/deap_memory.py                      # 8 and 32 subjects (2 cores: ~25 min)
    python benchmarks/deap_memory.py --subjects 8 --job-batches 20   # quicker
    python benchmarks/deap_memory.py --baseline 5d7afe9   # also measure an older zoo (git ref)

Subjects are generated in DEAP's exact ``sXX.dat`` format (``write_demo_deap``) into a temporary
folder (never committed). Each measurement is its own process, sampled every 50 ms from /proc
over the whole process tree: peak RssAnon (anonymous memory: what a memory map's file pages,
which the kernel can reclaim, do not count in) and peak VmRSS.

- **setup**: ``DeapDataModule(protocol=loso).setup()`` plus the normalisation statistics, on a
  cache miss (an empty cache folder), a cache hit, and ``data.cache=off`` (preprocessed in
  memory, as every job did before the cache) or, with ``--baseline``, the older zoo's own code;
- **job**: one LOSO epoch of ``train.py experiment=eeg_cnn_lstm data=deap``, miss and hit;
- **throughput**: training windows/s (forward + backward + step, batch 64) from the memory
  map and from memory.

The figures the issue measured before the cache are printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
# measured on this machine before the cache existed (one LOSO epoch, whole process tree)
BEFORE = {
    8: {"job_s": 102, "rss": 3.37, "anon": 3.00, "f32": 0.29},
    32: {"job_s": 426, "rss": 8.08, "anon": 7.72, "f32": 1.17},
}


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) in bytes summed over ``pid`` and its descendants."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    anon = rss = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
                    elif line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, rss


def measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd``, sampling its process tree's memory; wall time, peaks and its stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = {"anon": 0, "rss": 0}
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        anon, rss = _tree_memory(proc.pid)
        peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
        time.sleep(0.05)
    reader.join()
    text = "".join(out)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    result = {"wall_s": time.perf_counter() - started, **peak}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[len("RESULT ") :]))
    return result


SETUP = """
import json, sys, time
sys.path.insert(0, {tree!r})
from zoo.data.deap import DeapDataModule
kwargs = dict(data_dir={data!r}, subset={n}, protocol="loso")
if {cache!r} != "baseline":
    kwargs["cache"] = {cache!r}
t = time.perf_counter()
dm = DeapDataModule(**kwargs)
dm.setup()
if hasattr(type(dm), "norm_stats"):
    dm.norm_stats
print("RESULT " + json.dumps({{"setup_s": time.perf_counter() - t}}), flush=True)
"""

THROUGHPUT = """
import json, sys, time
sys.path.insert(0, {tree!r})
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from zoo.data.deap import DeapDataModule
torch.manual_seed(0)
torch.set_num_threads({threads})
kwargs = dict(data_dir={data!r}, subset={n}, protocol="loso")
if {cache!r} != "baseline":
    kwargs["cache"] = {cache!r}
dm = DeapDataModule(**kwargs)
dm.setup()
cfg = OmegaConf.load({tree!r} + "/conf/model/eeg_cnn_lstm.yaml")
cfg.class_names = dm.class_names
cfg.net.in_channels, cfg.net.num_classes = len(dm.channel_names), dm.num_classes
cfg.scheduler = None
model = instantiate(cfg)
if hasattr(model, "set_input_stats"):
    model.set_input_stats(dm.norm_stats)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loader = dm.train_dataloader()
seen, t = 0, None
for i, (x, y) in enumerate(loader):
    if i == 5:
        seen, t = 0, time.perf_counter()  # after warm-up
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    seen += len(y)
    if i == 5 + {steps}:
        break
print("RESULT " + json.dumps({{"windows_per_s": seen / (time.perf_counter() - t)}}), flush=True)
"""


def setup_run(tree: Path, data: Path, n: int, cache: str) -> dict:
    code = SETUP.format(tree=str(tree), data=str(data), n=n, cache=cache)
    return measured([sys.executable, "-c", code], cwd=tree)


def job_run(tree: Path, data: Path, n: int, cache: str, work: Path, batches: int | None) -> dict:
    cmd = [
        sys.executable,
        str(tree / "train.py"),
        "experiment=eeg_cnn_lstm",
        "data=deap",
        f"data.data_dir={data}",
        f"data.subset={n}",
        "data.protocol=loso",
        "trainer.max_epochs=1",
        f"paths.root_dir={work}",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
    ]
    if cache != "baseline":
        cmd.append(f"data.cache={cache}")
    if batches:
        cmd.append(f"trainer.limit_train_batches={batches}")
    return measured(cmd, env={"ZOO_ROOT": str(work)}, cwd=work)


def throughput(tree: Path, data: Path, n: int, cache: str, steps: int) -> float:
    code = THROUGHPUT.format(
        tree=str(tree), data=str(data), n=n, cache=cache, steps=steps, threads=2
    )
    return measured([sys.executable, "-c", code], cwd=tree)["windows_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--data-dir", type=Path, help="reuse generated subjects here")
    parser.add_argument("--job-batches", type=int, help="limit_train_batches of the jobs")
    parser.add_argument("--no-jobs", action="store_true", help="setup and throughput only")
    parser.add_argument("--steps", type=int, default=40, help="throughput: timed steps")
    parser.add_argument("--baseline", help="a git ref of an older zoo, measured the same way")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from zoo.data.demo.deap import write_demo_deap

    tmp = Path(tempfile.mkdtemp(prefix="zoo-deap-bench-"))
    data = args.data_dir or tmp / "data_preprocessed_python"
    t = time.perf_counter()
    write_demo_deap(data, n_subjects=max(args.subjects))
    print(f"{max(args.subjects)} subjects in DEAP's format: {time.perf_counter() - t:.0f} s")
    baseline = None
    if args.baseline:
        baseline = tmp / "baseline"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
            check=True,
            capture_output=True,
        )
    rows = []
    try:
        for n in args.subjects:
            cache = tmp / f"cache-{n}"
            r = {"n": n}
            r["miss"] = setup_run(REPO, data, n, str(cache))
            r["hit"] = setup_run(REPO, data, n, str(cache))
            r["before"] = (
                setup_run(baseline, data, n, "baseline")
                if baseline
                else setup_run(REPO, data, n, "off")
            )
            r["cache_bytes"] = sum(p.stat().st_size for p in cache.glob("*.npy"))
            if not args.no_jobs:
                jcache = tmp / f"jobcache-{n}"
                for kind in ("job_miss", "job_hit"):
                    work = tmp / f"work-{n}-{kind}"
                    work.mkdir()
                    r[kind] = job_run(REPO, data, n, str(jcache), work, args.job_batches)
                if baseline:
                    work = tmp / f"work-{n}-before"
                    work.mkdir()
                    r["job_before"] = job_run(baseline, data, n, "baseline", work, args.job_batches)
            rows.append(r)
            print(json.dumps(r), flush=True)
        n = max(args.subjects)
        tput = {
            "memory map": throughput(REPO, data, n, str(tmp / f"cache-{n}"), args.steps),
            "in memory (cache=off)": throughput(REPO, data, n, "off", args.steps),
        }
        if baseline:
            tput[f"before ({args.baseline})"] = throughput(
                baseline, data, n, "baseline", args.steps
            )
    finally:
        if baseline:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)],
                capture_output=True,
            )
    report(rows, tput, bool(baseline), args)
    print(f"\n(data and caches in {tmp}; remove it when done)")


def report(rows, tput, have_baseline: bool, args) -> None:
    before_name = f"before ({args.baseline})" if have_baseline else "cache=off"
    print("\n## data setup (DeapDataModule.setup + statistics), one process each")
    print(
        f"| subjects | miss s | hit s | {before_name} s | miss/before | anon GiB miss | "
        f"anon GiB hit | anon GiB {before_name} | cache GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, h, b = r["miss"], r["hit"], r["before"]
        print(
            f"| {r['n']} | {m['setup_s']:.1f} | {h['setup_s']:.1f} | {b['setup_s']:.1f} | "
            f"{m['setup_s'] / b['setup_s']:.2f} | {m['anon'] / GIB:.2f} | {h['anon'] / GIB:.2f} | "
            f"{b['anon'] / GIB:.2f} | {r['cache_bytes'] / GIB:.2f} |"
        )
    if "job_miss" in rows[0]:
        limit = f" (limit_train_batches={args.job_batches})" if args.job_batches else ""
        print(f"\n## one LOSO epoch of train.py{limit}, whole process tree")
        print(
            "| subjects | job | wall s | peak RSS GiB | peak anon GiB | float32 EEG GiB | "
            "anon / float32 |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            f32 = r["cache_bytes"] / GIB
            b = BEFORE.get(r["n"])
            if b:
                print(
                    f"| {r['n']} | before the cache | {b['job_s']} | {b['rss']:.2f} | "
                    f"{b['anon']:.2f} | {b['f32']:.2f} | {b['anon'] / b['f32']:.1f}× |"
                )
            for kind in ("job_before", "job_miss", "job_hit"):
                if kind in r:
                    j = r[kind]
                    print(
                        f"| {r['n']} | {kind[4:]} | {j['wall_s']:.0f} | {j['rss'] / GIB:.2f} | "
                        f"{j['anon'] / GIB:.2f} | {f32:.2f} | {j['anon'] / GIB / f32:.1f}× |"
                    )
        if len(rows) >= 2:
            lo, hi = rows[0], rows[-1]
            per_subject_f32 = (hi["cache_bytes"] - lo["cache_bytes"]) / (hi["n"] - lo["n"])
            for kind in ("job_miss", "job_hit"):
                growth = (hi[kind]["anon"] - lo[kind]["anon"]) / (hi["n"] - lo["n"])
                print(
                    f"{kind[4:]}: anonymous memory grows {growth / per_subject_f32:.2f}× each "
                    f"added subject's float32 signal from {lo['n']} to {hi['n']} subjects "
                    "(target ≤ 0.25×; before: 5.4×)"
                )
            b_lo, b_hi = BEFORE.get(lo["n"]), BEFORE.get(hi["n"])
            if b_lo and b_hi:
                print(
                    "targets at 32 subjects: miss ≤ 2.5 GiB anon, hit ≤ 1.5 GiB, hit setup ≤ 10 s"
                )
    print(f"\n## training throughput, {max(args.subjects)} subjects, batch 64, 2 threads")
    first = next(iter(tput.values()))
    for name, v in tput.items():
        print(f"  {name:28s} {v:8.0f} windows/s  ({v / first:.2f}× the memory map)")


if __name__ == "__main__":
    main()
