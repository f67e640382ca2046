"""Train and evaluate orchestration: short and linear, everything else lives in helpers."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import zoo
from zoo import kernels, tracking
from zoo.errors import ConfigError, one_line
from zoo.reports import Report

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


def build(node: DictConfig, key: str, **kwargs) -> Any:
    """hydra.utils.instantiate with errors that name the config key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        raise ConfigError(f"could not build '{key}': {one_line(str(exc))}") from exc


def build_all(group: DictConfig | None, key: str, **kwargs) -> list[Any]:
    if not group:
        return []
    return [
        build(node, f"{key}.{name}", **kwargs)
        for name, node in group.items()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path}: checkpoint file not found")
    try:
        # mmap: reading the run id of a resumed checkpoint must not read all its tensors
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ConfigError(
            f"ckpt_path={path}: not a loadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None


class RunInfo(L.Callback):
    """Stores the mlflow run id and the resolved config in every checkpoint, so a resumed job
    continues the same run and a bare checkpoint can be evaluated without its config."""

    def __init__(self, cfg: DictConfig, run: tracking.TrainingRun):
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.run = run

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["zoo"] = {
            "mlflow_run_id": self.run.run_id,
            "config": self.config_yaml,
            "version": zoo.__version__,
        }


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


def train(cfg: DictConfig) -> float | None:
    """Fit, test with the best checkpoint, log everything to mlflow; returns the best monitored
    value (what hyper-parameter sweeps optimise)."""
    configure_kernels(cfg)
    loggers_cfg = cfg.get("logger") or {}
    mlflow_loggers = {n for n, node in loggers_cfg.items() if "MLFlow" in str(node.get("_target_"))}
    for name in mlflow_loggers:  # fail fast on an unreachable store, before any work; create
        node = loggers_cfg[name]  # the experiment here, safely when many jobs start at once
        uri = tracking.open_store(node.get("tracking_uri"))
        tracking.ensure_experiment(uri, node.get("experiment_name") or "lightning_logs")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt = read_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None

    datamodule = build(cfg.data, "data")
    model = build(cfg.model, "model")
    loggers = []
    for name, node in loggers_cfg.items():
        extra = {"run_id": _run_id_for(cfg, ckpt)} if name in mlflow_loggers else {}
        loggers.append(build(node, f"logger.{name}", **extra))
    run = tracking.TrainingRun(
        next((lg for lg in loggers if isinstance(lg, tracking.MLFlowLogger)), None)
    )
    callbacks = build_all(cfg.get("callbacks"), "callbacks") + [RunInfo(cfg, run)]
    if not loggers:  # logger=none: Lightning's LR monitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)

    with run.guard():
        run.start(cfg, model, resumed=ckpt is not None or bool(cfg.get("run_id")))
        if cfg.get("train", True):
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
            )
        ckpt_cb = trainer.checkpoint_callback
        best_path = getattr(ckpt_cb, "best_model_path", "") or ""
        best_score = getattr(ckpt_cb, "best_model_score", None)
        run.log_best_checkpoint(best_path)  # a no-op on ranks other than 0
        test_metrics = {}
        if cfg.get("test", True):
            if not best_path:
                log.warning("No best checkpoint (checkpointing off?): testing the current weights.")
            trainer.test(
                model, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True
            )
            test_metrics = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
            }
        run.set_tag("zoo.kernels", kernels.used_backend())
    run.finish()

    monitor = getattr(ckpt_cb, "monitor", None) or "-"
    summary = {"experiment": cfg.get("name"), "mlflow run id": run.run_id or "(mlflow logging off)"}
    summary[f"best {monitor}"] = f"{float(best_score):.4f}" if best_score is not None else "-"
    summary.update({k: f"{v:.4f}" for k, v in sorted(test_metrics.items())})
    summary["best checkpoint"] = best_path or "-"
    summary["output dir"] = cfg.paths.output_dir
    if run.run_id:
        uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
        summary["look at it"] = (
            f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else uri
        )
        summary["report"] = f"python evaluate.py run_id={run.run_id}"
    print_summary(summary)
    return float(best_score) if best_score is not None else None


# --------------------------------------------------------------------------- evaluate


def _config_digest(cfg: DictConfig) -> tuple[str, str]:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Rebuild data + model from a run (or a checkpoint), test, and write/log a report."""
    configure_kernels(cfg)
    task = cfg.get("task")
    if task is not None and task != "detection":
        raise ConfigError(f"task={task!r}: the only model-free evaluation is task=detection")
    if task == "detection" and not (cfg.get("run_id") or cfg.get("ckpt_path")):
        from zoo.reports.detection import coco_files_report

        return coco_files_report(cfg)
    if cfg.get("run_ids"):
        return compare(cfg)
    uri = cfg.tracking.tracking_uri
    if cfg.get("run_id"):
        _, run = tracking.get_run(cfg.run_id, uri)
        train_cfg = tracking.load_run_config(cfg.run_id, uri)
        artifact = run.data.tags.get(tracking.TAG_BEST_CKPT)
        if not artifact:
            raise ConfigError(
                f"run_id={cfg.run_id}: the run logged no best checkpoint (tag {tracking.TAG_BEST_CKPT}); "
                "was it trained with logger=mlflow to the end?"
            )
        ckpt_path = tracking.download_artifact(cfg.run_id, artifact, uri)
        state = read_checkpoint(ckpt_path)
        target_run, source = cfg.run_id, f"mlflow run {cfg.run_id} ({artifact})"
    elif cfg.get("ckpt_path"):
        ckpt_path, source = Path(cfg.ckpt_path), f"checkpoint {cfg.ckpt_path}"
        state = read_checkpoint(ckpt_path)
        meta = state.get("zoo", {})
        if meta.get("config"):
            train_cfg = OmegaConf.create(meta["config"])
        elif cfg.get("model") and cfg.get("data"):
            train_cfg = cfg
        else:
            raise ConfigError(
                f"ckpt_path={ckpt_path} carries no config: also give experiment=<name> it was trained with"
            )
        target_run = meta.get("mlflow_run_id")
        if target_run:
            try:
                tracking.get_run(target_run, uri)
            except ConfigError:
                target_run = None
    else:
        raise ConfigError(
            "evaluate.py needs run_id=<mlflow run id>, ckpt_path=<file> [experiment=<name>], "
            "or 'run_ids=[<id1>,<id2>]' for a comparison"
        )

    datamodule = build(train_cfg.data, "data")
    model = build(train_cfg.model, "model")
    model.load_state_dict(state["state_dict"])
    limit = (
        cfg.get("limit_test_batches")
        or OmegaConf.select(train_cfg, "trainer.limit_test_batches")
        or 1.0
    )
    trainer = L.Trainer(
        accelerator=cfg.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_test_batches=limit,
        callbacks=build_all(cfg.get("callbacks"), "callbacks"),
    )
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    metrics = {k: float(v) for k, v in sorted(results.items())}

    name = train_cfg.get("name") or "model"
    report = Report(f"Evaluation report: {name}")
    report.key_values(
        {
            "evaluated": source,
            "experiment": name,
            "mlflow run": target_run or "-",
            "model": OmegaConf.select(train_cfg, "model._target_"),
            "data": OmegaConf.select(train_cfg, "data._target_"),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        ("", ""),
    )
    report.heading("Test metrics")
    report.table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    if hasattr(model, "add_report_sections"):
        metrics.update(model.add_report_sections(report) or {})
    if hasattr(datamodule, "summary"):
        report.heading("Dataset")
        report.key_values(datamodule.summary(), ("", ""))
    digest, yaml_text = _config_digest(train_cfg)
    report.heading("Config digest")
    report.key_values(
        {
            "sha256 (first 16)": digest,
            "seed": train_cfg.get("seed"),
            **{
                k: OmegaConf.select(train_cfg, k)
                for k in ("trainer.max_epochs", "data.protocol", "data.batch_size")
                if OmegaConf.select(train_cfg, k) is not None
            },
        },
        ("", ""),
    )
    report.code(yaml_text, "full resolved config")

    out_dir = Path(
        cfg.get("output_dir")
        or Path(cfg.paths.log_dir)
        / "reports"
        / f"{target_run or Path(ckpt_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    files = report.write(out_dir, metrics)
    if target_run:
        tracking.client(uri).log_artifacts(target_run, str(out_dir), "report")
    print(
        f"\nReport written to {out_dir}\n  {files['html']}\n  {files['markdown']}\n  {files['metrics']}"
        + (f"\n  (also logged to mlflow run {target_run} under report/)" if target_run else ""),
        flush=True,
    )
    return metrics


def compare(cfg: DictConfig) -> dict[str, float]:
    """Comparison report of several runs, logged to a new run of kind 'comparison'."""
    from zoo.reports.comparison import comparison_report

    uri = cfg.tracking.tracking_uri
    ids = [str(r) for r in cfg.run_ids]
    if len(ids) < 2:
        raise ConfigError(f"run_ids={ids}: give at least two runs to compare")
    client = tracking.client(uri)
    runs = [tracking.get_run(i, uri)[1] for i in ids]
    report, flat = comparison_report(client, runs)
    out_dir = Path(
        cfg.get("output_dir")
        or Path(cfg.paths.log_dir) / "reports" / f"comparison-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    files = report.write(out_dir, flat)
    new_id = tracking.create_run(
        uri,
        cfg.tracking.experiment_name,
        f"comparison-{time.strftime('%Y%m%d-%H%M%S')}",
        {tracking.TAG_KIND: "comparison", "zoo.compared_runs": ",".join(ids)},
    )
    client.log_artifacts(new_id, str(out_dir), "report")
    client.set_terminated(new_id, "FINISHED")
    print(
        f"\nComparison report written to {out_dir}\n  {files['html']}\n  {files['markdown']}\n"
        f"  (logged to new mlflow run {new_id}, tag {tracking.TAG_KIND}=comparison)",
        flush=True,
    )
    return {"comparison_run_id": new_id, **flat}
