"""``python -m zoo.export <run id | model uri> format=onnx|torch_export [output=<dir>]``: a
logged zoo model's inference network as an ONNX file (``model.onnx``) or a ``torch.export``
program (``model.pt2``), checked against the eager network on the model's input example, and
logged to its run under ``export/`` with ``export.json`` (the check's numbers).

What is exported is the family's ``export_network()`` (``zoo.outputs.Exportable``): the network
``serve`` runs, over tensors, with the batch (and, for text, the length) dimension left free.
The kernels' custom ops go into a ``torch.export`` program as themselves (their fake kernels
trace them), and into ONNX through their pure-PyTorch reference, which ONNX's standard ops
express. Detection models are not exportable: ``GroupSoftmaxDetector.export_network`` says why.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo import kernels
from zoo.errors import ConfigError, ZooError, one_line

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torch_export": "model.pt2"}


class ExportMismatch(ZooError):
    """The exported network does not compute what the eager one does (a bug, not bad input)."""

    exit_code = 1


TOLERANCE = 1e-4  # largest absolute difference from the eager network on the input example


def export_module(module, example: Any, fmt: str, out_dir: str | Path) -> dict[str, Any]:
    """Export ``module``'s inference network into ``out_dir`` and check it on ``example`` (its
    serving input: an array or a dict of arrays); returns what ``export.json`` records."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if not hasattr(module, "export_network"):
        raise ConfigError(f"{type(module).__name__} has no export_network: it cannot be exported")
    net, inputs, outputs, dims = module.export_network()
    net = net.cpu().eval()
    if isinstance(example, dict):
        tensors = tuple(torch.as_tensor(np.asarray(example[name])) for name in inputs)
    else:
        tensors = (torch.as_tensor(np.asarray(example)),)
    tensors = _unspecialised(tensors, inputs, dims)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FORMATS[fmt]
    with torch.no_grad():
        eager = net(*tensors)
        if fmt == "torch_export":
            program = torch.export.export(net, tensors, dynamic_shapes=_dynamic(inputs, dims))
            torch.export.save(program, path)
            exported = torch.export.load(path).module()(*tensors)
        else:
            with kernels.backend_as("reference"):  # ONNX's standard ops express the reference
                torch.onnx.export(
                    net,
                    tensors,
                    path,
                    input_names=inputs,
                    output_names=outputs,
                    dynamic_shapes=_dynamic(inputs, dims),
                    dynamo=True,
                    external_data=False,
                )
            exported = torch.from_numpy(onnx_run(path, inputs, tensors)[0])
    error = float((exported.float() - eager.float()).abs().max()) if eager.numel() else 0.0
    record = {
        "format": fmt,
        "file": path.name,
        "inputs": {n: list(t.shape) for n, t in zip(inputs, tensors)},
        "outputs": outputs,
        "dynamic": {n: {str(d): _name(s) for d, s in dims.get(n, {}).items()} for n in inputs},
        "max_abs_error": error,
        "tolerance": TOLERANCE,
        "torch": torch.__version__,
    }
    (out_dir / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    if not error <= TOLERANCE:
        raise ExportMismatch(
            f"the exported network differs from the eager one by {error:.3g} on the input "
            f"example (tolerance {TOLERANCE}); nothing was logged"
        )
    return record


def _unspecialised(tensors: tuple, inputs: list[str], dims: dict[str, dict[int, Any]]) -> tuple:
    """The example with every free dimension of size 1 doubled (the values repeated):
    ``torch.export`` specialises a dimension it sees at size 1 to the constant 1, so a logged
    example of one image would pin the exported batch to one."""
    out = []
    for name, t in zip(inputs, tensors):
        for d in dims.get(name, {}):
            if t.shape[d] == 1:
                t = torch.cat([t, t], dim=d)
        out.append(t)
    return tuple(out)


def _name(spec) -> str:
    return spec if isinstance(spec, str) else f"{spec[0]} (at most {spec[1]})"


def onnx_run(path: str | Path, inputs: list[str], tensors) -> list[np.ndarray]:
    """The ONNX file run by ONNX Runtime (CPU) on ``tensors``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: t.numpy() for n, t in zip(inputs, tensors)})


def _dynamic(inputs: list[str], dims: dict[str, dict[int, Any]]):
    """torch.export's dynamic shapes: one ``Dim`` per name, shared by the inputs that name it
    (a name, or (name, largest size))."""
    made: dict[str, Any] = {}

    def dim(spec):
        name, top = (spec, None) if isinstance(spec, str) else spec
        if name not in made:
            made[name] = (
                torch.export.Dim(name, min=1, max=top) if top else torch.export.Dim(name, min=1)
            )
        return made[name]

    return tuple({d: dim(spec) for d, spec in dims.get(n, {}).items()} for n in inputs)


def load_logged(source: str, tracking_uri: str | None = None):
    """(module, input example, run id) of a run's logged model (a run id) or of a model URI."""
    from mlflow.models import Model

    from zoo import tracking
    from zoo.tracking.serving import load_module

    model_uri = source
    if "://" not in source and not source.startswith(("models:/", "runs:/")):
        _, run = tracking.get_run(source, tracking_uri)
        model_uri = run.data.tags.get(tracking.TAG_MODEL_URI)
        if not model_uri:
            raise ConfigError(
                f"run {source} has no logged mlflow Model (tag {tracking.TAG_MODEL_URI}); "
                "was it trained with tracking.log_model on, to the end?"
            )
    local = tracking.download_model(model_uri, tracking_uri)
    example = Model.load(str(local.path)).load_input_example(str(local.path))
    if example is None:
        raise ConfigError(f"{model_uri}: the logged model has no input example to check against")
    module = load_module(_config(local), local.artifacts["weights"])
    if hasattr(module, "export_network"):
        module.export_network()  # a family that does not export says why, before anything else
    if getattr(module, "preprocessing", None):  # a raw example: the network's input from it
        raw = module.raw_inputs()
        if not raw.is_tensor_input(example):
            example = raw.network_input(raw.parse(example))
    if hasattr(example, "to_dict") and not isinstance(example, dict):
        example = example.to_numpy()
    return module, example, local.run_id


def _config(local):
    from omegaconf import OmegaConf

    from zoo import legacy

    return legacy.upgrade(OmegaConf.load(local.artifacts["config"]))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "python -m zoo.export <run id | model uri> format=onnx|torch_export [output=<dir>]"
    try:
        source, options = _parse(argv, usage)
        fmt = options.get("format", "onnx")
        if fmt not in FORMATS:
            raise ConfigError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
        uri = options.get("tracking_uri")
        module, example, run_id = load_logged(source, uri)
        out_dir = Path(options.get("output") or tempfile.mkdtemp(prefix="zoo-export-"))
        record = export_module(module, example, fmt, out_dir)
        if run_id:
            from zoo import tracking

            tracking.client(uri).log_artifacts(run_id, str(out_dir), "export")
    except ZooError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    where = f" and logged to run {run_id} under export/" if run_id else ""
    print(
        f"exported {source} as {fmt}: {out_dir / record['file']}{where} (largest difference "
        f"from the eager network on its input example: {record['max_abs_error']:.2e}, "
        f"tolerance {TOLERANCE})"
    )
    return 0


def _parse(argv: list[str], usage: str) -> tuple[str, dict[str, str]]:
    known = {"format", "output", "tracking_uri"}
    source, options = None, {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            if source is not None:
                raise ConfigError(f"{arg!r}: give one run id or model uri ({usage})")
            source = arg
        elif key not in known:
            raise ConfigError(f"{key}=: not an option of zoo.export (options: {sorted(known)})")
        else:
            options[key] = value
    if source is None:
        raise ConfigError(f"which model? {usage}")
    return source, options


if __name__ == "__main__":
    raise SystemExit(main())
