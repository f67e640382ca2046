"""The op layer, derived from the registry (``zoo.kernels.spec``): schemas, fake (meta) kernels,
autograd formulas, and which implementation serves which device.

The schemas are defined here, in Python, so neither backend depends on the other:

- ``torch.ops.zoo.*``: CPU kernels from the C++ library (``csrc/cpu``, registered there with
  ``TORCH_LIBRARY_IMPL(zoo, CPU)``), CUDA kernels from Triton (``zoo.kernels.triton``,
  registered by ``register_triton``) where Triton and a GPU are present. No nvcc is needed.
- ``torch.ops.zoo_triton.*``: the same schemas with the Triton kernels on every device, so the
  Triton implementation can be run and ``opcheck``-ed on CPU tensors under TRITON_INTERPRET=1.

Every backward is itself an op with a fake kernel, so torch.compile traces through forward and
backward without graph breaks.
"""

from __future__ import annotations

import functools

import torch

from zoo.kernels.ops import REGISTRY


def define(ns: str) -> None:
    """Define every registered op of namespace ``ns``: schema, fake kernel and autograd, and the
    same for its backward op (once per process)."""
    with REGISTRY.lock:
        if ns in REGISTRY.libraries:
            return
        lib = torch.library.Library(ns, "DEF")
        for spec in REGISTRY:
            lib.define(spec.op + spec.schema)
            if spec.differentiable:
                lib.define(spec.backward_op + spec.backward_schema)
        REGISTRY.libraries[ns] = lib
        ops = getattr(torch.ops, ns)
        for spec in REGISTRY:
            torch.library.register_fake(f"{ns}::{spec.op}", spec.fake, lib=lib)
            if not spec.differentiable:
                continue
            torch.library.register_fake(f"{ns}::{spec.backward_op}", spec.backward_fake, lib=lib)
            torch.library.register_autograd(
                f"{ns}::{spec.op}",
                functools.partial(spec.backward, getattr(ops, spec.backward_op)),
                setup_context=spec.setup_context,
                lib=lib,
            )


def triton_launcher(name: str):
    """A Triton launcher: ``name`` in ``zoo.kernels.triton``, or ``<module>.<name>`` in one of
    its modules (a new op's Triton file)."""
    import importlib

    from zoo.kernels import triton as tk

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(f"{tk.__name__}.{module}") if module else tk, attr)


def register_triton(ns: str, dispatch_keys: tuple[str, ...]) -> None:
    """Serve ``ns``'s ops on ``dispatch_keys`` with the Triton launchers."""
    define(ns)
    with REGISTRY.lock:
        lib = torch.library.Library(ns, "IMPL")
        for spec in REGISTRY:
            for op, launcher in zip(spec.ops, spec.triton, strict=True):
                for key in dispatch_keys:
                    lib.impl(op, triton_launcher(launcher), key)
        REGISTRY.impl_libraries.append(lib)
