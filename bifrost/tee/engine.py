"""Trusted-side delegation engine: encrypt → worker → decrypt → verify, one refresh per delegated layer.

Every call is a complete *decrypt-then-encrypt refresh* boundary: the input is freshly encrypted at
the top CKKS level, the worker spends exactly one level (one plaintext multiplication; TenSEAL rescales it), and
the result is decrypted here. No ciphertext outlives one delegated layer, so no bootstrapping is ever
needed and the noise budget never accumulates across layers.

Nothing a worker sends steers decoding: scales, levels and blockings come from the call's trusted
record (``EncryptedBatch.state``) and the trusted copy of the weights. Every reply is verified before it is
used, as its backend declares (``CKKSBackend.verification``): *exactly* where the reply is an exact function of
public data (native: ``ExactTrustedContext.verify``, Freivalds' test mod each prime, miss ≤ 2^-64 whatever the
deviation, no tolerance), else against the backend's error bound (TenSEAL: :mod:`.verify`, plus a window of
replay fingerprints).

Failure classes. A reply that arrived intact over mutual TLS and fails verification — the wrong size, shape
or headers, a value out of range, or the product check — is a *deviation*: the worker that sent it is
quarantined (:class:`~bifrost.tee.pool.WorkerQuarantine`) and the product is computed here from the trusted weights instead. A call that
brings back no reply (a transport failure, a timeout, any error status: :mod:`.pool`) is an *availability*
event: the pool moves it to another worker, and when none replies it is computed here; nobody is quarantined,
so an outsider who breaks the stream cannot get an honest worker banned. Calls served by a quarantined worker
are always recomputed here (their replies are still decrypted and verified, as an honest one's would be, then
discarded); when a quarantined worker exists that product is started before the request goes out, so it
overlaps the worker's round trip. What a caught worker can still observe is stated in the quarantine section of :mod:`bifrost.tee.pool`.

Rows a worker sees are padded to :func:`~bifrost.ckks.row_bucket` (zero rows), so a prompt's length is
visible to it only to within a factor of 1.5.

The secret key stays in ``self._keys`` (a :class:`~bifrost.ckks.TrustedContext`); only its
``public_context()`` and ciphertexts are handed to the link.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Mapping

import numpy as np

from ..ckks import (
    CiphertextError,
    CKKSParams,
    ExactTrustedContext,
    GroupShape,
    GroupTraffic,
    row_bucket,
)
from ..ckks.registry import get_backend
from ..config import VerificationConfig
from ..errors import InternalError, RefusedError, UnavailableError, UserError
from ..model.delegation import Site
from ..proto import worker_pb2
from .link import WorkerCallError, WorkerLink, WorkerReply
from .pool import WorkerQuarantine
from .verify import CheckOperand, ProductVerifier

log = logging.getLogger("bifrost.engine")

REPLAY_WINDOW = 1 << 17  # output-ciphertext fingerprints remembered per session (~6 MB)
_LOCAL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tee-local-linear")


@dataclass
class CallStats:
    """Accumulated costs of delegated calls (seconds, bytes, counts)."""

    calls: int = 0
    encrypt_s: float = 0.0
    rpc_s: float = 0.0  # wall time of the RPC: transfer + worker compute
    worker_s: float = 0.0  # worker-reported compute
    decrypt_s: float = 0.0
    verify_s: float = 0.0  # range + product checks, replay fingerprints
    local_s: float = 0.0   # products recomputed in the TEE (quarantined or deviating worker)
    bytes_sent: int = 0
    bytes_received: int = 0
    checks: int = 0        # rows × members verified (× vectors for a tolerance check)
    deviations: int = 0    # calls whose reply failed a check
    local_calls: int = 0   # calls whose product was computed in the TEE
    first_deviation: int = -1  # index (0-based, in ``calls`` order) of the first call whose reply deviated
    groups: dict = field(default_factory=dict)  # group -> GroupTraffic (what the estimator predicts)

    @property
    def transfer_s(self) -> float:
        return max(self.rpc_s - self.worker_s, 0.0)

    def snapshot(self) -> "CallStats":
        out = CallStats(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "groups"})
        out.groups = {g: s.copy() for g, s in self.groups.items()}
        return out

    def minus(self, other: "CallStats") -> "CallStats":
        later = other.first_deviation < 0 <= self.first_deviation  # the first deviation fell in this period
        out = CallStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)
                           if f.name not in ("groups", "first_deviation")},
                        first_deviation=self.first_deviation - other.calls if later else -1)
        for g, s in self.groups.items():
            out.groups[g] = s.minus(other.groups.get(g, GroupTraffic()))
        return out


def check_operands(backend: str, params: CKKSParams, weights: Mapping[str, np.ndarray]) -> dict[str, CheckOperand]:
    """Every site's :class:`~.verify.CheckOperand` (what its product is checked against): made once per replica.
    For a backend verified exactly only the weights' statistics are kept (decryption needs them)."""
    impl = get_backend(backend)
    if impl.verification == "exact":
        return {name: CheckOperand.stats_only(w) for name, w in weights.items()}
    return {name: CheckOperand.of(w, lambda m: impl.quantized_weights(params, m)) for name, w in weights.items()}


class NoWorkerError(UnavailableError):
    """No CKKS worker replied to a layer call and ``delegation.on_no_worker`` is ``fail``: the turn ends
    (availability; nobody is quarantined)."""


class DelegationEngine:
    """Owns the CKKS keys, check vectors and worker link of one session."""

    def __init__(self, link: WorkerLink, backend: str, params: CKKSParams, site_list: list[Site],
                 groups: list[tuple[str, ...]], weights: Mapping[str, np.ndarray], *,
                 verify: VerificationConfig | None = None, quarantine: WorkerQuarantine | None = None,
                 operands: Mapping[str, CheckOperand] | None = None, prepare: bool = True,
                 on_no_worker: str = "tee") -> None:
        """``weights``: the trusted copy of every site's weight, (d_out, d_in) — the products are checked
        against it, and computed from it when a worker deviates. ``operands``: its check operands, shared by
        the sessions of a replica (default: made here, :func:`check_operands`). ``on_no_worker``
        (``delegation.on_no_worker``): a call that brings back no reply is computed here (``tee``) or raises
        :class:`NoWorkerError` (``fail``)."""
        self.link = link
        self.on_no_worker = on_no_worker
        self.sites = {s.name: s for s in site_list}
        self.group_of: dict[str, tuple[str, ...]] = {n: g for g in groups for n in g}
        self.shapes = {g: GroupShape(self.sites[g[0]].d_in, tuple(self.sites[n].d_out for n in g)) for g in groups}
        self._refs = {g: worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=n, digest=self.sites[n].digest) for n in g])
                      for g in groups}
        missing = [n for n in self.sites if n not in weights]
        if missing:
            raise UserError(f"no trusted weights for delegated layers {missing[:3]}")
        self._weights = {g: [np.asarray(weights[n], dtype=np.float64) for n in g] for g in groups}
        self.quarantine = quarantine if quarantine is not None else WorkerQuarantine()
        self.stats = CallStats()
        self._seen: set[bytes] = set()
        self._seen_order: collections.deque = collections.deque()
        self._check_worker_serves_sites()
        self.params = params
        self._backend = get_backend(backend)
        self._keys = self._backend.keygen(params, sorted(set(self.shapes.values()), key=repr))
        operands = operands or check_operands(backend, params, weights)
        # how replies are verified is the backend's declaration: exactly (no tolerance, no replay window) or
        # against its error bound (bifrost.tee.verify: range and product checks, replay fingerprints)
        self.exact = self._backend.verification == "exact"
        self._exact_keys: ExactTrustedContext | None = None  # self._keys, when replies are verified exactly
        if self.exact:
            if not isinstance(self._keys, ExactTrustedContext):
                raise InternalError(f"backend {backend!r} declares exact verification but its keys cannot verify")
            self._exact_keys = self._keys
        self.verifier = None if self.exact else ProductVerifier({g: [operands[n] for n in g] for g in groups}, verify)
        self._stats_of = {g: [operands[n].stats for n in g] for g in groups}
        for g in groups:  # what decryption needs from the trusted weights (native: mask products; cached per process)
            self._keys.prepare(self.shapes[g], self._stats_of[g])
        public = self._keys.public_context()
        self.public_context_bytes = len(public)
        self.prepare_seconds = link.open_worker_sessions(backend, public, list(self._refs.values()) if prepare else [])
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
                raise UserError(f"worker does not serve layer {s.name!r}: is it running the same model?")
            if got.digest != s.digest:
                raise RefusedError(f"worker's weights for {s.name!r} differ from ours (digest mismatch)")

    def rows_per_call(self, group: tuple[str, ...], rows: int) -> int:
        return self._backend.rows_per_call(self.params, self.shapes[group], rows)

    def run_group(self, group: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        """``[x @ W_n.T for n in group]`` for ``x`` (rows × d_in, float64), computed under CKKS and verified.

        The rows are padded with zero rows to :func:`row_bucket` and split into calls as the backend says
        (``rows_per_call``: bounds a request's size and the worker's working memory; every part is
        planned again); decode steps (one row) are always one call."""
        x = np.asarray(x, dtype=np.float64)
        rows = len(x)
        padded = row_bucket(rows)
        if padded != rows:
            x = np.concatenate([x, np.zeros((padded - rows, x.shape[1]))])
        return [y[:rows] for y in self._run_rows(group, x)]

    def _run_rows(self, group: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        per_call = self.rows_per_call(group, len(x))
        if len(x) > per_call:
            parts = [self._run_rows(group, x[i: i + per_call]) for i in range(0, len(x), per_call)]
            return [np.concatenate(member) for member in zip(*parts)]
        return self._call(group, x)

    def _local(self, group: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        return [x @ w.T for w in self._weights[group]]

    def _call(self, group: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        shape, st, stats = self.shapes[group], self.stats, self._stats_of[group]
        t0 = time.perf_counter()
        batch = self._keys.encrypt(shape, x, stats)
        t1 = time.perf_counter()
        # The next call of this size (the next layer's) gets its encryption masks ready while this one is out.
        self._keys.prefetch(shape, len(x))
        # With a quarantined worker among this link's workers, start the TEE's own product now so that it overlaps
        # the round trip: a quarantined worker's calls then keep the timing of an honest one.
        quarantined = len(self.quarantine) and any(w in self.quarantine for w in self.link.identities())
        ahead: Future | None = _LOCAL.submit(self._local, group, x) if quarantined else None
        reply, failure, worker = None, "", ""
        try:
            reply = self.link.linear(self._refs[group], batch.ciphertexts, rows=len(x))
        except WorkerCallError as exc:
            # No reply reached us (transport failure, timeout, an error status, no worker left): availability, never
            # a deviation. The pool has marked the worker down; this product is computed here.
            if self.on_no_worker == "fail":
                if ahead is not None:
                    ahead.cancel()
                raise NoWorkerError(f"no CKKS worker replied ({exc.code.name}) and delegation.on_no_worker is fail: "
                                    "the turn ends") from None
            log.debug("no worker reply (%s): computing the product in the TEE", exc.code.name)
        t2 = time.perf_counter()
        ys, received, verify_s = None, 0, 0.0
        if reply is not None:
            worker = reply.worker
            received = sum(len(c) for o in reply.outputs for c in o)
            try:
                failure = self._check_size(shape, received, len(x))
                if not failure and not self.exact:
                    failure = self._check_replay(reply)
                if not failure:  # (values decrypted here are used only once the reply is verified, below)
                    ys = self._keys.decrypt(shape, reply.outputs, batch, stats)
                if not failure and self._exact_keys is not None:
                    tv = time.perf_counter()
                    if not self._exact_keys.verify(shape, reply.outputs, batch, stats):  # reuses decrypt's parse
                        failure, ys = "product check", None
                    verify_s = time.perf_counter() - tv
            except CiphertextError as exc:
                failure, ys = f"malformed reply: {exc}", None
        t3 = time.perf_counter()
        if ys is not None and self.verifier is not None:  # verified against the error bound (not exactly)
            result = self.verifier.check(group, x, ys, self._keys.error_bound(shape, batch, stats),
                                         self._keys.effective_input(batch),
                                         self._keys.error_bound(shape, batch, stats, effective=True))
            st.checks += result.comparisons
            if not result.ok:
                # the check's name only: its ratio to the tolerance depends on decrypted values, and the
                # quarantine file and the log are outside the TEE
                failure = f"{result.reason} check"
        elif ys is not None:
            st.checks += len(x) * len(group)  # every output of every row verified exactly
        t4 = time.perf_counter()
        if failure:  # an intact reply (mutual TLS) that is not the product: only this is held against a worker
            st.deviations += 1
            if st.first_deviation < 0:
                st.first_deviation = st.calls
            self.quarantine.add(worker, failure.split(":")[0])  # the kind, without a malformed reply's details
            log.debug("call to %s deviated: %s", worker[:23], failure)
        if reply is None or failure or worker in self.quarantine or ys is None:
            ys = ahead.result() if ahead is not None else self._local(group, x)
            st.local_calls += 1
        elif ahead is not None:
            ahead.cancel()
        t5 = time.perf_counter()
        st.calls += 1
        st.encrypt_s += t1 - t0
        st.rpc_s += t2 - t1
        st.worker_s += reply.compute_s if reply is not None else 0.0
        st.decrypt_s += t3 - t2 - verify_s
        st.verify_s += t4 - t3 + verify_s
        st.local_s += t5 - t4
        sent = sum(len(c) for c in batch.ciphertexts)
        st.bytes_sent += sent
        st.bytes_received += received
        g = st.groups.setdefault(group, GroupTraffic())
        g.calls += 1
        g.rows += len(x)
        g.cts_in += len(batch.ciphertexts)
        g.cts_out += sum(len(o) for o in reply.outputs) if reply is not None else 0
        g.bytes_sent += sent
        g.bytes_received += received
        return ys

    def _check_size(self, shape: GroupShape, received: int, rows: int) -> str:
        """A reply over the exact size of an honest one is refused unread."""
        limit = self._backend.max_output_bytes(self.params, shape, rows)
        return f"oversized reply: {received} bytes for at most {limit}" if received > limit else ""

    def _check_replay(self, reply: WorkerReply) -> str:
        """Tolerance-checked backends only: exact replays of a recent output ciphertext (a function of its bytes).
        An exactly verified reply needs no such window: an old reply is not the product of a fresh c_0."""
        prints = []
        for member in reply.outputs:
            for ct in member:
                fp = hashlib.blake2b(len(ct).to_bytes(4, "little") + ct[-64:], digest_size=12).digest()
                prints.append(fp)
        if len(set(prints)) != len(prints) or any(fp in self._seen for fp in prints):
            return "replayed ciphertext"
        for fp in prints:
            self._seen.add(fp)
            self._seen_order.append(fp)
        while len(self._seen_order) > REPLAY_WINDOW:
            self._seen.discard(self._seen_order.popleft())
        return ""

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
