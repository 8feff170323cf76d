"""The front end's replica handles (bifrost.serve.replicas) implement the typed ReplicaAPI: typed requests in,
typed replies out, no dispatch by method name; every wait bounded; cancel/drop fire-and-forget."""

from __future__ import annotations

import inspect
import secrets
import threading
import time

import pytest

from bifrost.proto.replica import (Attested, AttestRequest, CancelRequest, CloseIdle, Closed, CloseRequest,
                                   DropSession, EmbedRequest, GenerateRequest, Refusal, ReplicaAPI, ReplicaInfo,
                                   SealedReply, Status)
from bifrost.serve.replicas import (LocalReplica, RayReplica, ReplicaDeadError, ReplicaHandle, ReplicaTimeoutError)

from .conftest import wait_until

API = [name for name, _ in inspect.getmembers(ReplicaAPI, inspect.isfunction) if not name.startswith("_")]


class FakeReplica:
    """The ReplicaAPI without a model: records the typed requests it got."""

    def __init__(self) -> None:
        self.got: list = []
        self.release = threading.Event()
        self.shut = False

    def info(self) -> ReplicaInfo:
        return ReplicaInfo("fake", "causal-lm", b"m" * 32, b"c" * 32, 128, "simulated", "bifrost", 1)

    def stats(self) -> dict:
        return {"sessions": 0}

    def attest(self, req: AttestRequest):
        self.got.append(req)
        return Attested(b"s" * 16, b"k" * 32, b"r" * 64, "simulated", b"e", b"m" * 32, b"c" * 32, req.suite)

    def generate(self, req: GenerateRequest):
        self.got.append(req)
        if req.sealed == b"slow":
            self.release.wait(10)
        yield SealedReply(b"t1")
        yield Refusal(Status.INVALID_ARGUMENT, "sealed", b"why")

    def embed(self, req: EmbedRequest):
        self.got.append(req)
        if req.sealed == b"boom":
            raise KeyError("a bug in the replica")
        return SealedReply(b"e")

    def close_sealed(self, req: CloseRequest):
        self.got.append(req)
        return Closed()

    def cancel(self, req: CancelRequest) -> bool:
        self.release.wait(10)  # a slow replica: the handle must not wait for it
        self.got.append(req)
        return True

    def drop_session(self, req: DropSession) -> bool:
        self.release.wait(10)
        self.got.append(req)
        return True

    def close_idle(self, req: CloseIdle) -> list[bytes]:
        self.got.append(req)
        return []

    def shutdown(self) -> None:
        self.shut = True


def test_the_fake_replica_the_handles_and_the_protocol_agree():
    assert set(API) >= {"attest", "generate", "embed", "close_sealed", "cancel", "drop_session", "close_idle",
                        "info", "stats", "shutdown"}
    assert isinstance(FakeReplica(), ReplicaAPI)
    for cls in (LocalReplica, RayReplica):
        for name in API:
            want = list(inspect.signature(getattr(ReplicaAPI, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
        assert callable(getattr(cls, "kill"))
        assert not hasattr(cls, "call") and not hasattr(cls, "cast") and not hasattr(cls, "stream")


def test_local_replica_passes_typed_requests_and_replies():
    fake = FakeReplica()
    h: ReplicaHandle = LocalReplica(fake, timeout_s=5)
    assert isinstance(h, ReplicaAPI)
    assert h.info().name == "fake" and h.stats() == {"sessions": 0}
    req = AttestRequest(b"n" * 16, b"k" * 32, "suite-x")
    out = h.attest(req)
    assert isinstance(out, Attested) and out.suite == "suite-x" and fake.got[-1] is req
    assert h.embed(EmbedRequest(b"s" * 16, b"x")) == SealedReply(b"e")
    assert isinstance(h.close_sealed(CloseRequest(b"s" * 16, b"c")), Closed)
    assert h.close_idle(CloseIdle(60.0)) == [] and fake.got[-1] == CloseIdle(60.0)
    items = list(h.generate(GenerateRequest(b"s" * 16, b"g", "r1")))
    assert items == [SealedReply(b"t1"), Refusal(Status.INVALID_ARGUMENT, "sealed", b"why")]


def test_an_exception_in_the_replica_propagates_unchanged():
    h = LocalReplica(FakeReplica(), timeout_s=5)
    with pytest.raises(KeyError):
        h.embed(EmbedRequest(b"s" * 16, b"boom"))


def test_cancel_and_drop_are_fire_and_forget():
    fake = FakeReplica()
    h = LocalReplica(fake, timeout_s=5)
    t0 = time.monotonic()
    assert h.cancel(CancelRequest(b"s" * 16, "r1")) is None
    assert h.drop_session(DropSession(b"s" * 16)) is None
    assert time.monotonic() - t0 < 1.0  # the replica is still blocked in both
    fake.release.set()
    wait_until(lambda: {type(r) for r in fake.got} == {CancelRequest, DropSession}, timeout_s=10,
               what="the replica to get both")


def test_a_stream_item_waits_at_most_the_handle_timeout():
    fake = FakeReplica()
    h = LocalReplica(fake, timeout_s=0.2)
    stream = h.generate(GenerateRequest(b"s" * 16, b"slow", "r1"))
    with pytest.raises(ReplicaTimeoutError):
        next(stream)
    fake.release.set()
    assert stream.next(5) == SealedReply(b"t1")


def test_a_killed_local_replica_is_dead():
    fake = FakeReplica()
    h = LocalReplica(fake)
    h.kill()
    assert fake.shut
    for call in (h.info, lambda: h.attest(AttestRequest(b"n" * 16, b"k" * 32)),
                 lambda: h.drop_session(DropSession(b"s" * 16))):
        with pytest.raises(ReplicaDeadError):
            call()


def test_the_real_replica_through_its_local_handle(local_app):
    """Against the deployment's TrustedReplica (needs its typed ReplicaAPI, bifrost/tee/replica.py)."""
    h = local_app.replicas[0]
    assert isinstance(h, LocalReplica) and isinstance(h.obj, ReplicaAPI)
    assert h.info().model_digest == local_app.service.info.model_digest
    before = h.stats()["sessions"]
    out = h.attest(AttestRequest(secrets.token_bytes(32), secrets.token_bytes(32), ""))
    assert isinstance(out, Attested) and h.stats()["sessions"] == before + 1
    refused = h.embed(EmbedRequest(secrets.token_bytes(16), b"opaque"))  # unknown session
    assert isinstance(refused, Refusal) and refused.status is Status.NOT_FOUND
    assert h.drop_session(DropSession(out.session_id)) is None
    wait_until(lambda: h.stats()["sessions"] == before, what="the dropped session to close")
    assert isinstance(h.close_idle(CloseIdle(3600.0)), list)
