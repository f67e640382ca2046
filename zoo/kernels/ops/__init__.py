"""The kernel ops, one module each. Importing this package registers every module's ``OpSpec``
(``zoo.kernels.spec``): ``from zoo.kernels.ops import REGISTRY`` gives all of them. A new op is a
module here; nothing lists it."""

import importlib
import pkgutil

from zoo.kernels.spec import REGISTRY

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY"]
