"""One spec per kernel op, and the registry everything else is derived from.

An op lives in one module of ``zoo.kernels.ops`` (found there, never listed; import the registry
from ``zoo.kernels.ops``, which has them all registered), one C++ file in
``csrc/cpu`` (registering its CPU kernels with ``TORCH_LIBRARY_IMPL(zoo, CPU)``) and its Triton
launchers in ``zoo.kernels.triton``. The module describes the op with an ``OpSpec`` and passes it
to ``register``. From the registry come:

- the ``torch.library`` definitions, fake kernels and autograd of ``torch.ops.zoo`` and
  ``torch.ops.zoo_triton`` (``zoo.kernels._ops``) and the Triton kernel registrations;
- the public functions of ``zoo.kernels`` (backend-selected) and ``zoo.kernels.triton`` (the
  Triton kernels on any device), both from the spec's ``call``;
- the C++ sources the library is built from (``zoo.kernels._build``);
- the opcheck and reference-parity tests over every implementation (tests/test_kernels.py) and
  the benchmark's ``--only`` choices.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class KernelFallbackWarning(UserWarning):
    """The compiled kernels cannot serve a call (the build failed, Triton is missing, a head dim
    is too large for a tile): the reference implementation is used."""


class Dispatch(Protocol):
    """Chooses what serves a call: ``ops(*tensors)`` is an op namespace (``torch.ops.zoo`` or
    ``torch.ops.zoo_triton``), or None for the reference; ``direct`` says the caller asked for
    one implementation (``zoo.kernels.triton``) rather than the backend's choice."""

    direct: bool

    def ops(self, *tensors: torch.Tensor) -> Any | None: ...


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op.

    name: the public function (``zoo.kernels.<name>``, ``zoo.kernels.triton.<name>``).
    call: ``call(dispatch, *args, **kwargs)``, the public function's body: argument checks, then
        the op of ``dispatch.ops(...)``, or the pure-PyTorch reference when that is None. Its
        signature (less ``dispatch``) and docstring are the public function's.
    op, schema, fake: the ``torch.library`` op the kernels implement, e.g. ``group_softmax_ce``
        and ``"(Tensor logits, ...) -> (Tensor, Tensor)"``, and its fake (meta) kernel.
    backward_schema, backward_fake: the op ``<op>_backward`` its autograd calls.
    setup_context, backward: ``torch.library.register_autograd``'s pair; ``backward`` takes the
        namespace's backward op first: ``backward(backward_op, ctx, *grads)``. An op with no
        gradient (a kernel map: integer outputs) leaves these four None; it then has no
        ``<op>_backward``, and its ``triton`` names one launcher.
    cpu_source: its C++ file under ``csrc/``.
    triton: its Triton launchers (op, backward), or (op,) for an op with no gradient: names in
        ``zoo.kernels.triton``, or ``<module>.<name>`` for a module of that package (a new op's
        own Triton file, named ``_<op>.py``: a module named like the op would hide
        ``zoo.kernels.triton.<op>``).
    cases: ``cases()`` -> [(args, kwargs)], inputs (on CPU) on which every implementation must
        match the reference, gradients included (an op with no gradient: exactly).
    opcheck: ``opcheck(ops, put)`` -> [(op, args)] for ``torch.library.opcheck`` of the op and
        its backward in the namespace ``ops`` (``put`` moves tensors to the implementation's
        device).
    bench: ``bench(quick)`` -> [(label, args, kwargs)], the inputs (on CPU) that
        ``benchmarks/kernels.py --only <name>`` times the compiled op on against the reference
        (the spec's ``cases`` when None).
    """

    name: str
    call: Callable[..., Any]
    op: str
    schema: str
    fake: Callable[..., Any]
    cpu_source: str
    triton: tuple[str, ...]
    cases: Callable[[], list[tuple[tuple, dict]]]
    opcheck: Callable[[Any, Callable], list[tuple[Any, tuple]]]
    backward_schema: str | None = None
    backward_fake: Callable[..., Any] | None = None
    setup_context: Callable[..., None] | None = None
    backward: Callable[..., Any] | None = None
    bench: Callable[[bool], list[tuple[str, tuple, dict]]] | None = None

    def __post_init__(self) -> None:
        parts = (self.backward_schema, self.backward_fake, self.setup_context, self.backward)
        if any(p is None for p in parts) and any(p is not None for p in parts):
            raise ValueError(
                f"kernel op {self.name!r}: give all of backward_schema, backward_fake, "
                "setup_context and backward, or none of them"
            )
        if len(self.triton) != (2 if self.differentiable else 1):
            raise ValueError(
                f"kernel op {self.name!r}: triton names (op, backward) launchers for an op "
                "with a gradient, (op,) for one without"
            )

    @property
    def differentiable(self) -> bool:
        return self.backward is not None

    @property
    def ops(self) -> tuple[str, ...]:
        """The op and, when it has a gradient, its backward op."""
        return (self.op, self.backward_op) if self.differentiable else (self.op,)

    @property
    def backward_op(self) -> str:
        return f"{self.op}_backward"

    def bind(self, dispatch: Dispatch) -> Callable[..., Any]:
        """The public function of this op served as ``dispatch`` chooses."""

        @functools.wraps(self.call)
        def public(*args, **kwargs):
            return self.call(dispatch, *args, **kwargs)

        params = list(inspect.signature(self.call).parameters.values())[1:]
        public.__signature__ = inspect.Signature(params)
        public.__name__ = public.__qualname__ = self.name
        del public.__wrapped__  # the signature above, not call's
        return public


@dataclass
class Registry:
    """The registered specs, by name, and the ``torch.library`` objects made from them."""

    specs: dict[str, OpSpec] = field(default_factory=dict)
    libraries: dict[str, torch.library.Library] = field(default_factory=dict)
    impl_libraries: list[torch.library.Library] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __iter__(self):
        return iter(list(self.specs.values()))

    def __getitem__(self, name: str) -> OpSpec:
        return self.specs[name]

    def names(self) -> list[str]:
        return list(self.specs)


REGISTRY = Registry()


def register(spec: OpSpec) -> OpSpec:
    if spec.name in REGISTRY.specs and REGISTRY.specs[spec.name] is not spec:
        raise ValueError(f"kernel op {spec.name!r} is registered twice")
    REGISTRY.specs[spec.name] = spec
    return spec
