"""Train and evaluate orchestration: short and linear, everything else lives in helpers."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from zoo import cluster, console, faults, inference, kernels, legacy, parallel, tracking
from zoo.config import build, build_all
from zoo.errors import ConfigError, TrackingUndelivered, one_line
from zoo.faults import read_checkpoint
from zoo.outputs import File
from zoo.reports import Report
from zoo.tracking.delivery import deliver_before_resume
from zoo.tracking.lightning import RunInfo, TrackOutputs, ZooMLFlowLogger

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


def logged_step(ckpt: dict) -> int:
    """The step a checkpoint's metrics were logged at: Lightning's loggers count the batches
    that stepped an optimizer (``_batches_that_stepped``), which is the checkpoint's
    ``global_step`` only without gradient accumulation and with one optimizer step per batch
    (a manual-optimisation module such as PPO steps several times per batch)."""
    loop = ((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.state_dict") or {}
    return int(loop.get("_batches_that_stepped", ckpt.get("global_step", 0)))


def _run_id_for(cfg: DictConfig, ckpt: dict | None) -> str | None:
    """run_id= wins; otherwise a resumed checkpoint's run, if the tracking store has it."""
    if cfg.get("run_id"):
        tracking.get_run(cfg.run_id, cfg.tracking.tracking_uri)  # clear error if unknown
        return str(cfg.run_id)
    stored = (ckpt or {}).get("zoo", {}).get("mlflow_run_id")
    if stored:
        try:
            tracking.get_run(stored, cfg.tracking.tracking_uri)
            return stored
        except ConfigError:
            log.warning(
                "Checkpoint belongs to mlflow run %s, which is not in %s: starting a new run.",
                stored,
                tracking.resolve_tracking_uri(cfg.tracking.tracking_uri),
            )
    return None


def fit_and_test(cfg: DictConfig, trainer: L.Trainer, model, datamodule, ckpt_path=None):
    """Fit (unless train=false; resuming from ``ckpt_path``) and test the best checkpoint
    (unless test=false)."""
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    ckpt_cb = trainer.checkpoint_callback
    outcome = Outcome(
        best_path=getattr(ckpt_cb, "best_model_path", "") or "",
        best_score=getattr(ckpt_cb, "best_model_score", None),
        monitor=getattr(ckpt_cb, "monitor", None) or "-",
    )
    if cfg.get("test", True):
        if not outcome.best_path:
            log.warning("No best checkpoint (checkpointing off?): testing the current weights.")
        trainer.test(
            model, datamodule=datamodule, ckpt_path=outcome.best_path or None, weights_only=True
        )
        outcome.test_metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
    return outcome


def log_best_model(run: tracking.TrainingRun, cfg: DictConfig, model, datamodule, best_path: str):
    """The best checkpoint's weights as the run's mlflow Model (registered when
    registry.model_name is set)."""
    if parallel.is_parallel(model):  # split across processes: log a one-process twin
        model = build(cfg.model, "model")
    if best_path:
        model.load_state_dict(read_checkpoint(best_path)["state_dict"])
    name = OmegaConf.select(cfg, "registry.model_name") or None
    try:
        return run.log_model(model, cfg, datamodule, registered_model_name=name)
    except Exception as exc:  # the run's metrics and checkpoint are logged: keep them FINISHED
        reason = f"{type(exc).__name__}: {one_line(str(exc))[:300]}"
        log.warning(
            "The model could not be logged as an mlflow Model (%s); the run keeps its "
            "checkpoint (tag %s).",
            reason,
            tracking.TAG_BEST_CKPT,
        )
        run.set_tag("zoo.model_error", reason)
        return None


@rank_zero_only
def print_summary(lines: dict[str, Any]) -> None:
    width = max(len(k) for k in lines)
    body = "\n".join(f"  {k.ljust(width)} : {v}" for k, v in lines.items())
    print(f"\n{'=' * 72}\nzoo run summary\n{body}\n{'=' * 72}", flush=True)


# --------------------------------------------------------------------------- train


def configure_kernels(cfg: DictConfig) -> None:
    """kernels.backend (auto | compiled | reference) selects the zoo.kernels implementation."""
    name = OmegaConf.select(cfg, "kernels.backend")
    if name is None:
        return
    try:
        kernels.set_backend(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class Outcome:
    """What a training job produced: the best checkpoint and score, the test metrics and the
    logged mlflow Model."""

    best_path: str = ""
    best_score: Any = None
    monitor: str = "-"
    test_metrics: dict[str, float] = field(default_factory=dict)
    model_info: Any = None

    @property
    def best_value(self) -> float | None:
        return float(self.best_score) if self.best_score is not None else None


def train(cfg: DictConfig) -> float | None:
    """Fit, test with the best checkpoint, log everything to mlflow; returns the best monitored
    value (what hyper-parameter sweeps optimise)."""
    check_job(cfg)
    mlflow_loggers = open_tracking_stores(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    resume = faults.resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir)
    ckpt = read_checkpoint(resume, weights=False) if resume else None
    if ckpt is not None and mlflow_loggers and rank_zero_only.rank == 0:
        deliver_before_resume(resume, cfg.paths.output_dir)
    datamodule = build(cfg.data, "data")
    model = build(cfg.model, "model")
    parallel.check_model(model, cfg.trainer)
    loggers, run = build_loggers(cfg, mlflow_loggers, ckpt)
    stopper = faults.StopSafely()
    trainer = build_trainer(cfg, loggers, run, resume, stopper)

    with stopper.handling_signals():
        with run.guard(stopper):
            run.start(cfg, model, resumed=ckpt is not None or bool(cfg.get("run_id")))
            with run.system_metrics(cfg):
                outcome = fit_and_test(cfg, trainer, model, datamodule, resume)
            log_outcome(cfg, run, model, datamodule, outcome)
        run.finish()
    undelivered = deliver_queue(run, cfg)
    print_summary(summary(cfg, run, outcome))
    if undelivered:
        raise undelivered
    return outcome.best_value


def check_job(cfg: DictConfig) -> None:
    """Before any work: the console, the kernels backend, and whether the job's processes
    match the cluster allocation and the model-parallel layout."""
    console.tidy()
    configure_kernels(cfg)
    cluster.check_allocation(cfg.trainer)
    parallel.check_layout(cfg.trainer)


def _is_mlflow_logger(node: Any) -> bool:
    from hydra.utils import get_class

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        return bool(target) and issubclass(get_class(str(target)), MLFlowLogger)
    except Exception:  # an unknown class: build() names it
        return False


def open_tracking_stores(cfg: DictConfig) -> set[str]:
    """The names of the job's mlflow loggers, their stores checked (an unreachable one fails
    before any work) and their experiments created here, safely when many jobs start at once."""
    loggers_cfg = cfg.get("logger") or {}
    names = {n for n, node in loggers_cfg.items() if _is_mlflow_logger(node)}
    for name in names:
        node = loggers_cfg[name]
        uri = tracking.open_store(node.get("tracking_uri"))
        tracking.ensure_experiment(uri, node.get("experiment_name") or "lightning_logs")
    return names


def build_loggers(cfg: DictConfig, mlflow_loggers: set[str], ckpt: dict | None):
    """The configured loggers (an mlflow logger continues a resumed checkpoint's run) and the
    job's ``TrainingRun``."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        extra = {"run_id": _run_id_for(cfg, ckpt)} if name in mlflow_loggers else {}
        loggers.append(build(node, f"logger.{name}", **extra))
    run = tracking.TrainingRun(next((lg for lg in loggers if isinstance(lg, MLFlowLogger)), None))
    if ckpt is not None and isinstance(run.logger, ZooMLFlowLogger):
        run.logger.resume_after(logged_step(ckpt))
    return loggers, run


def build_trainer(cfg: DictConfig, loggers, run, resume, stopper) -> L.Trainer:
    """The configured trainer with the zoo's own callbacks (tracking, exact resume, safe stop)
    and atomic checkpoint writes."""
    callbacks = build_all(cfg.get("callbacks"), "callbacks") + [
        RunInfo(cfg, run),
        TrackOutputs(run),
        faults.RandomState(),
        faults.EpochAccumulators(),
        faults.CarryCheckpoints(resume),
        stopper,
    ]
    if not loggers:  # logger=none: Lightning's LR monitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [faults.AtomicCheckpointIO()]}
    return build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, **plugins)


def log_outcome(cfg: DictConfig, run: tracking.TrainingRun, model, datamodule, outcome: Outcome):
    """The best checkpoint (one file, whole weights) and the mlflow Model, into the run; while
    the tracking server is down, the Model is queued."""
    if outcome.best_path and Path(outcome.best_path).is_dir() and run.active:
        outcome.best_path = str(parallel.consolidate(outcome.best_path))
    run.log_best_checkpoint(outcome.best_path)  # a no-op on ranks other than 0
    run.set_tag("zoo.kernels", kernels.used_backend())
    if not run.active or OmegaConf.select(cfg, "tracking.log_model") is False:
        return
    name = OmegaConf.select(cfg, "registry.model_name") or None
    if run.pending and outcome.best_path:  # the server is down: log it when it is back
        run.defer_model(outcome.best_path, name)
    else:
        outcome.model_info = log_best_model(run, cfg, model, datamodule, outcome.best_path)


def summary(cfg: DictConfig, run: tracking.TrainingRun, outcome: Outcome) -> dict[str, Any]:
    """The lines of the end-of-job summary."""
    lines = {"experiment": cfg.get("name"), "mlflow run id": run.run_id or "(mlflow logging off)"}
    best = outcome.best_value
    lines[f"best {outcome.monitor}"] = f"{best:.4f}" if best is not None else "-"
    lines.update({k: f"{v:.4f}" for k, v in sorted(outcome.test_metrics.items())})
    lines["best checkpoint"] = outcome.best_path or "-"
    lines["output dir"] = cfg.paths.output_dir
    if run.run_id:
        uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        lines["look at it"] = (
            f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else uri
        )
        lines["report"] = f"python evaluate.py run_id={run.run_id}"
    info = outcome.model_info
    if info is not None:
        lines["mlflow model"] = info.model_uri
        if info.registered_model_version:
            name = OmegaConf.select(cfg, "registry.model_name")
            lines["registered"] = f"models:/{name}/{info.registered_model_version}"
    if run.pending:
        lines["tracking"] = f"{run.pending} records queued in {run.queue_dir}"
    return lines


def deliver_queue(run: tracking.TrainingRun, cfg: DictConfig) -> TrackingUndelivered | None:
    """At the end of a job, deliver what an outage queued (waiting up to tracking.outage_wait
    seconds for the server); the error to raise if the server is still down."""
    if not run.pending:
        return None
    wait = float(OmegaConf.select(cfg, "tracking.outage_wait") or 0)
    log.warning("Delivering %d queued tracking records (waiting up to %.0f s).", run.pending, wait)
    if run.flush(wait):
        return None
    return TrackingUndelivered(
        f"the tracking server {tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)} did "
        f"not answer by the end of the job. Training finished and its checkpoints are in "
        f"{cfg.paths.output_dir}; {run.pending} tracking records of run {run.run_id} (metrics, "
        f"tags, artifacts, its end) are queued in {run.queue_dir}. When the server is back, "
        f"deliver them into the same run with: python -m zoo.tracking.delivery "
        f"{cfg.paths.output_dir}"
    )


# --------------------------------------------------------------------------- evaluate


@dataclass
class Source:
    """What evaluate.py evaluates: a training config and weights, and the run it belongs to."""

    description: str
    train_cfg: DictConfig
    state_dict: dict[str, Any]
    run_id: str | None
    stem: str  # names the report folder


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """evaluate.py: dispatch to one of the modes (see conf/evaluate.yaml)."""
    console.tidy()
    configure_kernels(cfg)
    task = task_module(cfg.get("task"))
    given = [k for k in ("run_id", "ckpt_path", "model_uri") if cfg.get(k)]
    if task is not None and not given:
        return evaluate_task(cfg, task)
    if cfg.get("run_ids"):
        return compare(cfg)
    if len(given) > 1:
        raise ConfigError(f"give one of run_id=, ckpt_path=, model_uri= (got {', '.join(given)})")
    if cfg.get("run_id"):
        _, run = tracking.get_run(cfg.run_id, cfg.tracking.tracking_uri)
        if run.data.tags.get(tracking.TAG_KIND) == "study":
            return evaluate_study(cfg, run)
    source = resolve_source(cfg)
    metrics, outputs, datamodule, coverage = test_source(cfg, source)
    report, flat = model_report(source, metrics, outputs.sections, datamodule, coverage)
    write_report(cfg, report, flat, source.run_id, source.stem, "Report", outputs.test_files)
    return flat


# ------------------------------------------------------------- step 1: resolve the source


def resolve_source(cfg: DictConfig) -> Source:
    if cfg.get("run_id"):
        return source_from_run(cfg)
    if cfg.get("ckpt_path"):
        return source_from_checkpoint(cfg)
    if cfg.get("model_uri"):
        return source_from_model_uri(cfg)
    raise ConfigError(
        "evaluate.py needs run_id=<mlflow run id>, ckpt_path=<file> [experiment=<name>], "
        "model_uri=<models:/name/version or runs:/id/model>, or 'run_ids=[<id1>,<id2>]' for a "
        "comparison"
    )


def source_from_run(cfg: DictConfig) -> Source:
    uri = cfg.tracking.tracking_uri
    _, run = tracking.get_run(cfg.run_id, uri)
    artifact = run.data.tags.get(tracking.TAG_BEST_CKPT)
    if not artifact:
        raise ConfigError(
            f"run_id={cfg.run_id}: the run logged no best checkpoint (tag "
            f"{tracking.TAG_BEST_CKPT}); was it trained with logger=mlflow to the end?"
        )
    state = read_checkpoint(tracking.download_artifact(cfg.run_id, artifact, uri))
    return Source(
        description=f"mlflow run {cfg.run_id} ({artifact})",
        train_cfg=legacy.upgrade(tracking.load_run_config(cfg.run_id, uri)),
        state_dict=state["state_dict"],
        run_id=str(cfg.run_id),
        stem=str(cfg.run_id),
    )


def source_from_checkpoint(cfg: DictConfig) -> Source:
    path = Path(cfg.ckpt_path)
    state = read_checkpoint(path)
    meta = state.get("zoo", {})
    if meta.get("config"):
        train_cfg = legacy.upgrade(OmegaConf.create(meta["config"]))
    elif cfg.get("model") and cfg.get("data"):
        train_cfg = cfg
    else:
        raise ConfigError(
            f"ckpt_path={path} carries no config: also give experiment=<name> it was trained with"
        )
    run_id = meta.get("mlflow_run_id")
    if run_id:
        try:
            tracking.get_run(run_id, cfg.tracking.tracking_uri)
        except ConfigError:
            run_id = None
    return Source(f"checkpoint {path}", train_cfg, state["state_dict"], run_id, path.stem)


def source_from_model_uri(cfg: DictConfig) -> Source:
    """A logged (or registered) zoo model: its config and weights travel inside it."""
    model_uri = str(cfg.model_uri)
    local = tracking.download_model(model_uri, cfg.tracking.tracking_uri)
    artifacts = local.artifacts
    state = torch.load(artifacts["weights"], map_location="cpu", weights_only=True)
    run_id = local.run_id
    stem = model_uri.replace(":/", "-").replace("/", "-")
    return Source(
        f"mlflow model {model_uri}", OmegaConf.load(artifacts["config"]), state, run_id, stem
    )


# ------------------------------------------------------------- step 2: test


class CountTested(L.Callback):
    """Counts the samples a test actually ran over (limit_test_batches may stop it early)."""

    def __init__(self) -> None:
        self.samples = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        from lightning.pytorch.utilities.data import extract_batch_size

        self.samples += extract_batch_size(batch)


@dataclass
class Coverage:
    """How much of the test split an evaluation saw."""

    evaluated: int
    total: int | None
    unit: str
    limit: Any = None  # limit_test_batches, where it cut the split
    subset: Any = None  # data.subset, where the split itself is a subset

    def describe(self) -> str:
        text = f"{self.evaluated} of {self.total} test {self.unit}"
        if self.total is None:
            text = f"{self.evaluated} test {self.unit}"
        notes = []
        if self.total is not None and self.evaluated < self.total:
            notes.append(f"limit_test_batches={self.limit} stopped the test early")
        if self.subset is not None:
            notes.append(f"data.subset={self.subset}: the split is itself a subset of the data")
        return text + (f" ({'; '.join(notes)})" if notes else "")


def test_source(cfg: DictConfig, source: Source):
    """Rebuild data and model, load the weights, test; returns (metrics, what the model
    emitted (report sections, files), data module, coverage)."""
    train_cfg = source.train_cfg
    datamodule = build(train_cfg.data, "data")
    model = build(train_cfg.model, "model")
    model.load_state_dict(source.state_dict)
    limit = (
        cfg.get("limit_test_batches")
        or OmegaConf.select(train_cfg, "trainer.limit_test_batches")
        or None  # every batch
    )
    outputs = TrackOutputs()  # collects the sections; nothing is logged while testing here
    counter = CountTested()
    trainer = L.Trainer(
        accelerator=cfg.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_test_batches=limit,
        callbacks=[*build_all(cfg.get("callbacks"), "callbacks"), outputs, counter],
    )
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    metrics = {k: float(v) for k, v in sorted(results.items())}
    loader = trainer.test_dataloaders
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    try:
        total = len(loader.dataset)
    except (AttributeError, TypeError):  # an iterable dataset has no length
        total = None
    coverage = Coverage(
        counter.samples,
        total,
        getattr(datamodule, "sample_unit", "samples"),
        limit,
        OmegaConf.select(train_cfg, "data.subset", default=None),
    )
    return metrics, outputs, datamodule, coverage


# ------------------------------------------------------------- step 3: the report


def model_report(
    source: Source, metrics: dict[str, float], sections, datamodule, coverage: Coverage
):
    """The evaluation report of a model; returns (report, metrics for metrics.json)."""
    train_cfg = source.train_cfg
    name = train_cfg.get("name") or "model"
    report = Report(f"Evaluation report: {name}")
    report.key_values(
        {
            "evaluated": source.description,
            "evaluated on": coverage.describe(),
            "experiment": name,
            "mlflow run": source.run_id or "-",
            "model": OmegaConf.select(train_cfg, "model._target_"),
            "data": OmegaConf.select(train_cfg, "data._target_"),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    report.heading("Test metrics")
    if coverage.total is not None and coverage.evaluated < coverage.total:
        report.paragraph(
            f"These metrics (and the per-class support below) cover {coverage.evaluated} of the "
            f"{coverage.total} test {coverage.unit}: the rest of the test split was not "
            f"evaluated (limit_test_batches={coverage.limit}; evaluate.py limit_test_batches=1.0 "
            "evaluates all of it)."
        )
    report.table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    flat = dict(metrics)
    for section in sections:
        flat.update(report.add(section))
    if hasattr(datamodule, "summary"):
        report.heading("Dataset")
        report.key_values(datamodule.summary())
    yaml_text = OmegaConf.to_yaml(train_cfg, resolve=True)
    # a data module may name the config keys that say most about its evaluation
    keys = ("trainer.max_epochs", "data.batch_size", *getattr(datamodule, "digest_keys", ()))
    report.heading("Config digest")
    report.key_values(
        {
            "sha256 (first 16)": hashlib.sha256(yaml_text.encode()).hexdigest()[:16],
            "seed": train_cfg.get("seed"),
            **{
                k: OmegaConf.select(train_cfg, k)
                for k in keys
                if OmegaConf.select(train_cfg, k) is not None
            },
        }
    )
    report.code(yaml_text, "full resolved config")
    return report, flat


def write_report(
    cfg: DictConfig,
    report: Report,
    metrics: dict,
    run_id: str | None,
    stem: str,
    what: str,
    extra_files: list[File] = (),
) -> Path:
    """Write the report (Markdown, HTML, metrics.json, and files the model emitted while
    testing, e.g. per-trial predictions) and log it to ``run_id`` under report/."""
    out_dir = Path(
        cfg.get("output_dir")
        or Path(cfg.paths.log_dir) / "reports" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    files = report.write(out_dir, metrics)
    for extra in extra_files:
        target = out_dir / extra.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if extra.source is not None:
            shutil.copyfile(extra.source, target)
        else:
            extra.write(target)
    if run_id:
        tracking.client(cfg.tracking.tracking_uri).log_artifacts(run_id, str(out_dir), "report")
    lines = [f"\n{what} written to {out_dir}", f"  {files['html']}", f"  {files['markdown']}"]
    if "metrics" in files:
        lines.append(f"  {files['metrics']}")
    if run_id:
        lines.append(f"  (also logged to mlflow run {run_id} under report/)")
    print("\n".join(lines), flush=True)
    return out_dir


# --------------------------------------------------------------------------- predict


def predict(cfg: DictConfig) -> inference.Prediction:
    """predict.py: a trained model's answers to the raw files of ``input=``."""
    console.tidy()
    configure_kernels(cfg)
    if not cfg.get("input"):
        raise ConfigError("predict.py needs input=<file or folder> (see conf/predict.yaml)")
    device = pick_device(cfg.get("device") or "auto")
    source = resolve_source(cfg)
    module = load_source_model(source, device)
    raw = module.raw_inputs()
    raw.configure(cfg)
    output = Path(
        cfg.get("output")
        or Path(cfg.paths.log_dir)
        / "predictions"
        / f"{source.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    done = inference.predict_path(
        raw, Path(cfg.input), output, cfg.get("batch_size"), bool(cfg.get("progress", True))
    )
    print_prediction(source, done, module.device)
    return done


def pick_device(device: str) -> str:
    """``device=``: auto (cuda when there is one), cpu, cuda or cuda:<n>."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device={device!r}: expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: this machine has no CUDA device (use device=cpu)")
    return device


def load_source_model(source: Source, device: str):
    """The source's Lightning module with its weights, in eval mode on ``device``."""
    model = build(source.train_cfg.model, "model")
    model.load_state_dict(source.state_dict)
    return model.to(device).eval()


def print_prediction(source: Source, done: inference.Prediction, device) -> None:
    """The summary line, the skipped inputs grouped by reason, and the files written."""
    from collections import defaultdict

    lines = [
        f"\npredicted {done.items} {done.kind} with {source.description} on {device} in "
        f"{done.seconds:.1f} s ({done.rate():.1f} {done.kind}/s); "
        f"{len(done.skipped)} skipped"
    ]
    by_reason = defaultdict(list)
    for s in done.skipped:
        by_reason[s.reason].append(s.name)
    for reason, names in list(by_reason.items())[:10]:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        lines.append(f"  skipped {names[0]}{more}: {reason}")
    if len(by_reason) > 10:
        lines.append(f"  ... {len(by_reason) - 10} more reasons (see skipped.tsv)")
    lines += [f"  {path}" for path in done.written]
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------- the other modes


def task_module(task: str | None):
    """``task=<name>``: the module ``zoo.reports.<name>`` that scores files without a model
    (its ``task_report(cfg)`` gives the report and metrics, ``TASK_PARAMS`` the keys logged as
    params, ``task_stem(cfg)`` the report folder's name)."""
    import importlib
    import pkgutil

    import zoo.reports

    if task is None:
        return None
    tasks = sorted(
        m.name
        for m in pkgutil.iter_modules(zoo.reports.__path__)
        if hasattr(importlib.import_module(f"zoo.reports.{m.name}"), "task_report")
    )
    if task not in tasks:
        raise ConfigError(f"task={task!r}: the model-free evaluations are task={' | '.join(tasks)}")
    return importlib.import_module(f"zoo.reports.{task}")


def evaluate_task(cfg: DictConfig, task) -> dict[str, float]:
    """A model-free evaluation (``task_module``); the report goes to a new run."""
    name = task.__name__.rsplit(".", 1)[-1]
    report, metrics = task.task_report(cfg)
    run_id = None
    if cfg.get("log_to_mlflow", True):
        run_id = tracking.create_run(
            cfg.tracking.tracking_uri,
            cfg.tracking.experiment_name,
            f"{name}-eval-{time.strftime('%Y%m%d-%H%M%S')}",
            {tracking.TAG_KIND: "evaluation", "zoo.task": name},
        )
        client = tracking.client(cfg.tracking.tracking_uri)
        for key in task.TASK_PARAMS:
            client.log_param(run_id, key, str(cfg.get(key)))
        for key, value in metrics.items():
            if value == value and value >= 0:  # NaN: nothing scored; -1: no ground truth
                client.log_metric(run_id, key, value)
    write_report(cfg, report, metrics, run_id, task.task_stem(cfg), f"{name.capitalize()} report")
    if run_id:
        tracking.client(cfg.tracking.tracking_uri).set_terminated(run_id, "FINISHED")
    return metrics


def evaluate_study(cfg: DictConfig, run) -> dict[str, Any]:
    """run_id=<a study's parent run>: the study's report, from its fold runs as they are now."""
    from zoo.studies import cv

    kind = run.data.tags.get("zoo.study.type")
    if kind != cv.STUDY_TYPE:
        raise ConfigError(
            f"run_id={cfg.run_id} is the summary run of a {kind or 'multi-run'} study; its "
            "summary is in the run's study/ artifacts (the study's command with --collect-only "
            "writes it again)"
        )
    client = tracking.client(cfg.tracking.tracking_uri)
    report, flat = cv.report(cv.collect(client, run.info.run_id))
    write_report(cfg, report, flat, run.info.run_id, str(cfg.run_id), "Study report")
    return flat


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Comparison report of several runs, logged to a new run of kind 'comparison'."""
    from zoo.reports.comparison import comparison_report

    uri = cfg.tracking.tracking_uri
    ids = [str(r) for r in cfg.run_ids]
    if len(ids) < 2:
        raise ConfigError(f"run_ids={ids}: give at least two runs to compare")
    runs = [tracking.get_run(i, uri)[1] for i in ids]
    report, flat = comparison_report(tracking.client(uri), runs)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new_id = tracking.create_run(
        uri,
        cfg.tracking.experiment_name,
        f"comparison-{stamp}",
        {tracking.TAG_KIND: "comparison", "zoo.compared_runs": ",".join(ids)},
    )
    write_report(cfg, report, flat, new_id, "comparison", "Comparison report")
    tracking.client(uri).set_terminated(new_id, "FINISHED")
    return {"comparison_run_id": new_id, **flat}
