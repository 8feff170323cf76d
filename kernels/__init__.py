"""Bifrost native CKKS kernels (installed as ``bifrost_kernels``): registers the ``native`` backend.

Heavy imports (torch) happen only when the backend is requested.
"""

from bifrost.ckks.backend import register_backend


def _native_backend():
    from .backend import NativeBackend

    return NativeBackend()


register_backend("native", _native_backend)
