"""Every Protocol has its implementations checked against it.

Statically: mypy (``make test``, ``[tool.mypy]`` in pyproject.toml, which lists this file) checks the
functions under ``TYPE_CHECKING`` below, each returning implementations where the Protocol is expected; a
method missing or with an incompatible signature is a finding. Most implementations are also checked where
the code itself passes them as the Protocol (the backend registry, the engine's link, the deployment's
replica handles); this file covers every pair in one place, including those the code only reaches through
``isinstance`` (``ExactTrustedContext``) or through an untyped parameter (``ReplicaAPI``).

At run time (pytest, without mypy): every method of each Protocol is defined on each implementation.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bifrost.ckks import CKKSBackend, Evaluator, ExactTrustedContext, TrustedContext
    from bifrost.ckks.tenseal_backend import TenSEALBackend, TenSEALEvaluator, TenSEALTrustedContext
    from bifrost.proto.replica import ReplicaAPI
    from bifrost.serve.replicas import LocalReplica, RayReplica, ReplicaHandle
    from bifrost.tee.batching import BatchedLink
    from bifrost.tee.link import WorkerLink
    from bifrost.tee.pool import WorkerSessions
    from bifrost.tee.replica import TrustedReplica
    from bifrost_kernels.backend import NativeBackend, NativeEvaluator, NativeTrustedContext

    def _backends(native: NativeBackend, tenseal: TenSEALBackend) -> list[CKKSBackend]:
        return [native, tenseal]

    def _trusted_contexts(native: NativeTrustedContext, tenseal: TenSEALTrustedContext) -> list[TrustedContext]:
        return [native, tenseal]

    def _exact_contexts(native: NativeTrustedContext) -> list[ExactTrustedContext]:
        return [native]  # the native backend declares verification "exact"

    def _evaluators(native: NativeEvaluator, tenseal: TenSEALEvaluator) -> list[Evaluator]:
        return [native, tenseal]

    def _worker_links(sessions: WorkerSessions, batched: BatchedLink) -> list[WorkerLink]:
        return [sessions, batched]

    def _replicas(replica: TrustedReplica, local: LocalReplica, ray: RayReplica) -> list[ReplicaAPI]:
        return [replica, local, ray]

    def _replica_handles(local: LocalReplica, ray: RayReplica) -> list[ReplicaHandle]:
        return [local, ray]


IMPLEMENTATIONS = {  # Protocol -> its implementations ("module:Class")
    "bifrost.ckks.backend:CKKSBackend": ["bifrost_kernels.backend:NativeBackend",
                                         "bifrost.ckks.tenseal_backend:TenSEALBackend"],
    "bifrost.ckks.backend:TrustedContext": ["bifrost_kernels.backend:NativeTrustedContext",
                                            "bifrost.ckks.tenseal_backend:TenSEALTrustedContext"],
    "bifrost.ckks.backend:ExactTrustedContext": ["bifrost_kernels.backend:NativeTrustedContext"],
    "bifrost.ckks.backend:Evaluator": ["bifrost_kernels.backend:NativeEvaluator",
                                       "bifrost.ckks.tenseal_backend:TenSEALEvaluator"],
    "bifrost.tee.link:WorkerLink": ["bifrost.tee.pool:WorkerSessions", "bifrost.tee.batching:BatchedLink"],
    "bifrost.proto.replica:ReplicaAPI": ["bifrost.tee.replica:TrustedReplica", "bifrost.serve.replicas:LocalReplica",
                                         "bifrost.serve.replicas:RayReplica"],
    "bifrost.serve.replicas:ReplicaHandle": ["bifrost.serve.replicas:LocalReplica",
                                             "bifrost.serve.replicas:RayReplica"],
}


def _load(name: str) -> type:
    module, _, cls = name.partition(":")
    return getattr(importlib.import_module(module), cls)


def _methods(protocol: type) -> set[str]:
    return {name for base in protocol.__mro__ if getattr(base, "_is_protocol", False)
            for name, value in vars(base).items() if callable(value) and not name.startswith("_")}


@pytest.mark.parametrize("protocol,impl", [(p, i) for p, impls in IMPLEMENTATIONS.items() for i in impls])
def test_every_protocol_method_is_implemented(protocol, impl):
    methods = _methods(_load(protocol))
    assert methods, f"{protocol} declares no method"
    missing = sorted(m for m in methods if not callable(getattr(_load(impl), m, None)))
    assert not missing, f"{impl} lacks {missing} of {protocol}"
