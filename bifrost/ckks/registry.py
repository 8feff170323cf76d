"""The CKKS backends, by name: one explicit table (backends do not register themselves).

Each entry is a factory that imports its backend's module when called, so ``import bifrost.ckks`` loads
neither SEAL nor torch. The native backend is the installed ``bifrost_kernels`` package (the folder
``kernels/``); it is listed as available only where that package is installed.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    from .backend import CKKSBackend


def _tenseal() -> CKKSBackend:
    from .tenseal_backend import TenSEALBackend

    return TenSEALBackend()


def _native() -> CKKSBackend:
    from bifrost_kernels.backend import NativeBackend

    return NativeBackend()


# name -> (factory, the top-level package the factory needs installed)
BACKENDS: Mapping[str, tuple[Callable[[], CKKSBackend], str]] = {
    "tenseal": (_tenseal, "bifrost"),
    "native": (_native, "bifrost_kernels"),
}


def available_backends() -> list[str]:
    """The names of the backends whose package is installed."""
    return sorted(name for name, (_, package) in BACKENDS.items() if importlib.util.find_spec(package) is not None)


def get_backend(name: str) -> CKKSBackend:
    """A new instance of the backend ``name``; ValueError lists the available names otherwise."""
    if name not in available_backends():
        raise ValueError(f"unknown CKKS backend {name!r}; known: {available_backends()}")
    return BACKENDS[name][0]()
