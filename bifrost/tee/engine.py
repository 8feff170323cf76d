"""Trusted-side delegation engine: encrypt → worker → decrypt, one refresh per delegated layer.

Every call is a complete *decrypt-then-encrypt refresh* boundary: the input is freshly encrypted at
the top CKKS level, the worker spends exactly one level (one plaintext multiplication + rescale), and
the result is decrypted here. No ciphertext outlives one delegated layer, so no bootstrapping is ever
needed and the noise budget never accumulates across layers.

The secret key stays in ``self._keys`` (a :class:`~bifrost.ckks.TrustedContext`); only its
``public_context()`` and ciphertexts are handed to the gRPC stub.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields

import numpy as np

from ..ckks import CKKSParams, GroupShape, get_backend
from ..errors import BifrostError
from ..model.delegation import Site
from ..proto import worker_pb2
from .link import WorkerLink

ROWS_PER_CALL = 64


@dataclass
class CallStats:
    """Accumulated costs of delegated calls (seconds, bytes)."""

    calls: int = 0
    encrypt_s: float = 0.0
    rpc_s: float = 0.0  # wall time of the RPC: transfer + worker compute
    worker_s: float = 0.0  # worker-reported compute
    decrypt_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def transfer_s(self) -> float:
        return max(self.rpc_s - self.worker_s, 0.0)

    def snapshot(self) -> "CallStats":
        return CallStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def minus(self, other: "CallStats") -> "CallStats":
        return CallStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


class DelegationEngine:
    """Owns the CKKS keys of one session and its link to the worker(s)."""

    def __init__(self, link: WorkerLink, backend: str, params: CKKSParams, site_list: list[Site],
                 groups: list[tuple[str, ...]], prepare: bool = True) -> None:
        self.link = link
        self.sites = {s.name: s for s in site_list}
        self.group_of: dict[str, tuple[str, ...]] = {n: g for g in groups for n in g}
        self.shapes = {g: GroupShape(self.sites[g[0]].d_in, tuple(self.sites[n].d_out for n in g)) for g in groups}
        self._refs = {g: worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=n, digest=self.sites[n].digest) for n in g])
                      for g in groups}
        self.stats = CallStats()
        self._check_worker_serves_sites()
        backend_impl = get_backend(backend)
        self._keys = backend_impl.keygen(params, sorted(set(self.shapes.values()), key=repr))
        # rows one worker call carries: the backend's own rule when it has one, else ROWS_PER_CALL
        self._rows_per_call = getattr(self._keys, "rows_per_call", lambda _shape, _rows: ROWS_PER_CALL)
        public = self._keys.public_context()
        self.public_context_bytes = len(public)
        self.prepare_seconds = link.open_session(backend, public, list(self._refs.values()) if prepare else [])
        self._pending: tuple | None = None  # (group, input tensor, version, outputs) for fused siblings
        self.local_linears = False  # True inside in_tee(): delegated layers compute in plaintext here

    @contextlib.contextmanager
    def in_tee(self):
        """Run delegated layers in plaintext inside the TEE (Bifrost+ prefill); nothing goes to workers."""
        previous, self.local_linears = self.local_linears, True
        try:
            yield
        finally:
            self.local_linears = previous

    def _check_worker_serves_sites(self) -> None:
        served = {info.name: info for info in self.link.describe()}
        for s in self.sites.values():
            got = served.get(s.name)
            if got is None:
                raise BifrostError(f"worker does not serve layer {s.name!r}: is it running the same model?")
            if got.digest != s.digest:
                raise BifrostError(f"worker's weights for {s.name!r} differ from ours (digest mismatch)")

    def run_group(self, group: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        """``[x @ W_n.T for n in group]`` for ``x`` (rows × d_in, float64), computed under CKKS.

        A long prompt goes in several calls when the backend says so (``rows_per_call``; default at most
        ``ROWS_PER_CALL`` rows), which bounds the size of one request and the worker's working memory;
        decode steps (one row) are always one call.
        """
        shape = self.shapes[group]
        per_call = self._rows_per_call(shape, len(x))
        if len(x) > per_call:
            parts = [self.run_group(group, x[i : i + per_call]) for i in range(0, len(x), per_call)]
            return [np.concatenate(member) for member in zip(*parts)]
        t0 = time.perf_counter()
        batch = self._keys.encrypt(shape, x)
        t1 = time.perf_counter()
        outputs, worker_s = self.link.linear(self._refs[group], batch.ciphertexts, rows=len(x))
        t2 = time.perf_counter()
        ys = self._keys.decrypt(shape, outputs, batch.rows)
        t3 = time.perf_counter()
        st = self.stats
        st.calls += 1
        st.encrypt_s += t1 - t0
        st.rpc_s += t2 - t1
        st.worker_s += worker_s
        st.decrypt_s += t3 - t2
        st.bytes_sent += sum(len(c) for c in batch.ciphertexts)
        st.bytes_received += sum(len(c) for o in outputs for c in o)
        return ys

    def linear(self, name: str, x, version: int) -> np.ndarray:
        """Output of site ``name`` for input ``x`` (a torch tensor, rows × d_in).

        Sites fused with siblings (q/k/v, gate/up) are evaluated together on the first sibling's call
        and the siblings' results are handed out when they ask for the same input tensor.
        """
        group = self.group_of[name]
        if len(group) > 1 and self._pending is not None:
            pgroup, px, pversion, pout = self._pending
            if pgroup == group and px is x and pversion == version and name in pout:
                result = pout.pop(name)
                if not pout:
                    self._pending = None
                return result
        rows = x.detach().reshape(-1, x.shape[-1]).to("cpu").double().numpy()
        ys = self.run_group(group, rows)
        if len(group) == 1:
            return ys[0]
        out = dict(zip(group, ys))
        result = out.pop(name)
        self._pending = (group, x, version, out)
        return result

    def close(self) -> None:
        self.link.close()
