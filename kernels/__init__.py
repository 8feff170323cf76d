"""Bifrost native CKKS kernels (installed as ``bifrost_kernels``): registers the ``native`` backend.

Heavy imports (torch) happen only when the backend is requested. Run from the source tree, this folder is
also importable as a top-level ``kernels`` (transformers imports a package of that name when it probes for
Hugging Face's hub-kernels library); only the installed name registers, so one copy of the backend exists.
"""

from bifrost.ckks.backend import register_backend


def _native_backend():
    from .backend import NativeBackend

    return NativeBackend()


if __name__ == "bifrost_kernels":
    register_backend("native", _native_backend)
