"""Trusted-side delegation engine: encrypt → worker → decrypt, one refresh per delegated layer.

Every call is a complete *decrypt-then-encrypt refresh* boundary: the input is freshly encrypted at
the top CKKS level, the worker spends exactly one level (one plaintext multiplication + rescale), and
the result is decrypted here. No ciphertext outlives one delegated layer, so no bootstrapping is ever
needed and the noise budget never accumulates across layers.

The secret key stays in ``self._keys`` (a :class:`~bifrost.ckks.TrustedContext`); only its
``public_context()`` and ciphertexts are handed to the gRPC stub.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import grpc
import numpy as np

from ..ckks import CKKSParams, GroupShape, get_backend
from ..errors import BifrostError
from ..model.delegation import Site
from ..proto import worker_pb2, worker_pb2_grpc

MAX_MESSAGE_BYTES = 1 << 30


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


def connect(address: str, timeout_s: float = 30.0) -> grpc.Channel:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise BifrostError(f"no CKKS worker reachable at {address} within {timeout_s:.0f} s") from None
    return channel


class DelegationEngine:
    """Owns the CKKS keys of one session and the connection to one worker."""

    def __init__(self, channel: grpc.Channel, backend: str, params: CKKSParams, site_list: list[Site],
                 groups: list[tuple[str, ...]], timeout_s: float = 600.0, prepare: bool = True) -> None:
        self.stub = worker_pb2_grpc.CKKSWorkerStub(channel)
        self.timeout = timeout_s
        self.sites = {s.name: s for s in site_list}
        self.group_of: dict[str, tuple[str, ...]] = {n: g for g in groups for n in g}
        self.shapes = {g: GroupShape(self.sites[g[0]].d_in, tuple(self.sites[n].d_out for n in g)) for g in groups}
        self._refs = {g: worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=n, digest=self.sites[n].digest) for n in g])
                      for g in groups}
        self.stats = CallStats()
        self._check_worker_serves_sites()
        backend_impl = get_backend(backend)
        self._keys = backend_impl.keygen(params, sorted(set(self.shapes.values()), key=repr))
        public = self._keys.public_context()
        self.public_context_bytes = len(public)
        reply = self._call(self.stub.OpenSession, worker_pb2.OpenSessionRequest(
            backend=backend, public_context=public, prepare=list(self._refs.values()) if prepare else []))
        self.session_id = reply.session_id
        self.prepare_seconds = reply.prepare_seconds
        self._pending: tuple | None = None  # (group, input tensor, version, outputs) for fused siblings

    def _call(self, rpc, request):
        try:
            return rpc(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise BifrostError(f"worker call failed: {exc.code().name}: {exc.details()}") from None

    def _check_worker_serves_sites(self) -> None:
        served = {l.name: l for l in self._call(self.stub.Describe, worker_pb2.DescribeRequest()).layers}
        for s in self.sites.values():
            got = served.get(s.name)
            if got is None:
                raise BifrostError(f"worker does not serve layer {s.name!r}: is it running the same model?")
            if got.digest != s.digest:
                raise BifrostError(f"worker's weights for {s.name!r} differ from ours (digest mismatch)")

    def run_group(self, group: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        """``[x @ W_n.T for n in group]`` for ``x`` (rows × d_in, float64), computed under CKKS."""
        shape = self.shapes[group]
        t0 = time.perf_counter()
        batch = self._keys.encrypt(shape, x)
        t1 = time.perf_counter()
        request = worker_pb2.LinearRequest(session_id=self.session_id, group=self._refs[group],
                                           ciphertexts=batch.ciphertexts)
        reply = self._call(self.stub.Linear, request)
        t2 = time.perf_counter()
        outputs = [list(o.ciphertexts) for o in reply.outputs]
        ys = self._keys.decrypt(shape, outputs, batch.rows)
        t3 = time.perf_counter()
        st = self.stats
        st.calls += 1
        st.encrypt_s += t1 - t0
        st.rpc_s += t2 - t1
        st.worker_s += reply.compute_seconds
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
        try:
            self.stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=self.session_id), timeout=10)
        except grpc.RpcError:
            pass
