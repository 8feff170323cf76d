"""Bifrost native CKKS kernels (installed as ``bifrost_kernels``): the ``native`` backend.

Listed in the table of backends, :data:`bifrost.ckks.registry.BACKENDS`, which imports
:mod:`bifrost_kernels.backend` (and torch) only when the backend is requested; importing this package
registers nothing. Run from the source tree, this folder is also importable as a top-level ``kernels``
(transformers imports a package of that name when it probes for Hugging Face's hub-kernels library);
the table names ``bifrost_kernels``, so one copy of the backend exists.
"""
