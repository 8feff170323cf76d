"""A session the server lost (its replica killed, the front end restarted) is answered with the session-lost
marker, and each client acts on it: the SDK re-attests and sends the turn again only when that is safe
(nothing yielded, no reliance on the lost history), else raises :class:`SessionLostError`; the proxy ends a
cut stream with an OpenAI error event and resends a turn nothing of which was streamed; ``bifrost chat`` says
so in one line. In-process servers (runtime local) on a real CKKS worker; replicas killed with
``LocalReplica.kill``."""

from __future__ import annotations

import builtins

import grpc
import openai
import pytest
import yaml

from bifrost.model.tokenizer import ByteTokenizer, plain_chat_text
from bifrost.proto.wire import SESSION_LOST_TRAILER
from bifrost.serve.client import BifrostClient, ServingError, SessionLoss, SessionLostError
from tests.netfault import GrpcRelay

from .conftest import MODEL, connect, make_policy, plaintext_greedy, report, wait_until
from .test_proxy import running_proxy

TOK = ByteTokenizer()


def greedy(run_config, text: str, n: int) -> list[int]:
    return plaintext_greedy(MODEL, run_config.seed, TOK.encode(text), n)


def replica_of(app, client) -> int:
    entry = app.service.sessions.get(client.session_id)
    assert entry is not None, "the front end does not hold this client's session"
    return entry.replica


def holding_replica(app) -> int:
    """The one live replica holding a session (tests with a single client)."""
    held = [i for i, r in enumerate(app.replicas) if not r.dead and r.stats()["sessions"]]
    assert len(held) == 1, held
    return held[0]


def test_first_turn_on_a_lost_replica_is_sent_again_on_a_new_session(app_factory, controlled_worker, serve_run_config):
    app = app_factory(worker=controlled_worker.endpoint, replicas=2)
    losses: list[SessionLoss] = []
    c = connect(app, attest=False)
    c.on_session_lost = losses.append
    c.attest()
    r, old = replica_of(app, c), c.session_id
    app.replicas[r].kill()
    assert c.chat("lost before it began", 4).tokens == greedy(serve_run_config, "lost before it began", 4)
    assert losses == [SessionLoss("replica-lost", history_lost=False, retried=True)]
    assert c.session_id != old and replica_of(app, c) == 1 - r and c.session_losses == 1
    c.close()


def test_replica_lost_mid_stream_raises_partial_and_leaves_the_client_reattested(app_factory, controlled_worker,
                                                                                  serve_run_config):
    app = app_factory(worker=controlled_worker.endpoint, replicas=2)
    c = connect(app)
    r = replica_of(app, c)
    controlled_worker.delay_s = 0.05  # the turn is still running when its replica goes
    try:
        stream = c.generate("cut mid stream", 24)
        got = list(next(stream).token_ids)
        app.replicas[r].kill()
        with pytest.raises(SessionLostError) as err:
            for ev in stream:  # never a silently short stream: it ends with the error
                got += ev.token_ids
    finally:
        controlled_worker.delay_s = 0.0
    e = err.value
    assert e.partial and not e.history_lost and e.reattested and e.session_lost in ("replica-lost", "session-closed")
    assert isinstance(e, ServingError) and "partial" in str(e)
    assert got == greedy(serve_run_config, "cut mid stream", 24)[:len(got)] and len(got) < 24
    assert replica_of(app, c) == 1 - r  # re-attested on the surviving replica
    assert c.chat("after the loss", 3).tokens == greedy(serve_run_config, "after the loss", 3)
    c.close()


def test_turns_relying_on_lost_history_are_not_resent_others_are(app_factory, controlled_worker, serve_run_config):
    app = app_factory(worker=controlled_worker.endpoint, replicas=3)
    c = connect(app)
    c.chat("the first turn", 2)  # the session now holds history
    app.replicas[replica_of(app, c)].kill()
    with pytest.raises(SessionLostError) as err:
        c.chat("relies on the first turn", 2)
    e = err.value
    assert not e.partial and e.history_lost and e.reattested and e.session_lost == "replica-lost"
    assert "history" in str(e) and c.history_lost
    assert c.chat("a new conversation", 3, reset_history=True).tokens == greedy(serve_run_config,
                                                                               "a new conversation", 3)
    assert not c.history_lost
    # a messages= turn does not read the session's history: sent again on the next session
    c.chat("history again", 2)
    app.replicas[replica_of(app, c)].kill()
    messages = [{"role": "user", "content": "standalone"}]
    assert c.chat(messages=messages, max_new_tokens=3).tokens == greedy(serve_run_config,
                                                                         plain_chat_text(messages), 3)
    assert c.history_lost and c.session_losses == 2
    c.close()


def test_a_failed_reattestation_is_said_and_the_session_not_pretended(app_factory, controlled_worker):
    app = app_factory(worker=controlled_worker.endpoint, replicas=1)
    c = connect(app)
    lost = c.session_id
    app.replicas[0].kill()  # no replica left: attesting a new session fails too
    with pytest.raises(SessionLostError) as err:
        c.chat("nowhere to go", 2)
    e = err.value
    assert not e.reattested and e.session_lost == "replica-lost" and "call attest() again" in str(e)
    assert c.session_id == lost and c.session_losses == 0
    c.close()


def test_restarted_front_end_sessions_are_lost_and_reattested(app_factory, controlled_worker, serve_run_config,
                                                             fault_report):
    import time

    first = app_factory(worker=controlled_worker.endpoint, replicas=1)
    fresh, used = connect(first), connect(first)
    used.chat("before the restart", 2)
    port = first.port
    t_stop = time.monotonic()
    first.stop()
    second = app_factory(worker=controlled_worker.endpoint, replicas=1, port=port)
    t_up = time.monotonic()
    assert fresh.chat("after the restart", 3).tokens == greedy(serve_run_config, "after the restart", 3)
    t_answered = time.monotonic()
    assert second.service.sessions.get(fresh.session_id) is not None
    with pytest.raises(SessionLostError) as err:
        used.chat("continues the conversation", 2)
    assert err.value.session_lost == "unknown-session" and err.value.history_lost and err.value.reattested
    assert len(used.chat("anew", 2, reset_history=True).tokens) == 2
    report(fault_report, "front end restarted (same port; every session gone)",
           "a session without history: no error (re-attested, sent again); one with history: "
           "SessionLostError(unknown-session, history lost), nothing sent", True, t_answered - t_up,
           f"new front end serving -> the first turn answered (stop + start took {t_up - t_stop:.1f} s)")
    for c in (fresh, used):
        c.close()


def test_proxy_resends_an_unstreamed_turn_and_ends_a_cut_stream_with_an_error_event(app_factory, controlled_worker,
                                                                                   serve_run_config):
    app = app_factory(worker=controlled_worker.endpoint, replicas=3)
    want = TOK.decode(greedy(serve_run_config, "proxied turn", 4))
    with running_proxy(app, sessions=1) as (oai, pool):
        session = pool.clients[0]
        controlled_worker.delay_s = 0.05
        try:
            stream = oai.completions.create(model=MODEL, prompt="a proxied stream", max_tokens=24, stream=True)
            chunks = iter(stream)
            text = next(chunks).choices[0].text
            app.replicas[replica_of(app, session)].kill()
            with pytest.raises(openai.APIError) as err:
                for chunk in chunks:
                    text += chunk.choices[0].text
        finally:
            controlled_worker.delay_s = 0.0
        assert err.value.code == "session_lost" and "partial" in err.value.message
        assert TOK.decode(greedy(serve_run_config, "a proxied stream", 24)).startswith(text)
        app.replicas[replica_of(app, session)].kill()  # the session the SDK moved to: lost before the next turn
        got = oai.completions.create(model=MODEL, prompt="proxied turn", max_tokens=4)
        assert got.choices[0].text == want and session.session_losses == 2


def test_chat_cli_says_the_session_was_lost_and_resends_when_safe(app_factory, controlled_worker, serve_run_config,
                                                                   tmp_path, capsys, monkeypatch):
    from bifrost.cli import main

    app = app_factory(worker=controlled_worker.endpoint, replicas=3)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({"allow_simulated": True,
                                           "model_digests": [app.service.info.model_digest.hex()]}))
    script = iter([(None, "hello"), ("kill", "relies on hello"), (None, "third"), (None, "")])

    def scripted_input(prompt: str = "") -> str:
        action, line = next(script)
        if action == "kill":
            app.replicas[holding_replica(app)].kill()
        return line

    monkeypatch.setattr(builtins, "input", scripted_input)
    args = ["chat", "--address", f"127.0.0.1:{app.port}", "--policy", str(policy_file), "--max-new-tokens", "3"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert ("[session lost (replica-lost); attested a new session; the conversation history is lost; this prompt "
            "was not answered]") in out.err.splitlines()
    assert out.out.endswith("\n\n" + TOK.decode(greedy(serve_run_config, "third", 3)) + "\n")  # on the new session
    # --system: each prompt stands alone, so a prompt lost before any output is sent again
    script = iter([("kill", "alone"), (None, "")])
    assert main(args + ["--system", "Be brief."]) == 0
    out = capsys.readouterr()
    assert "[session lost (replica-lost); attested a new session; sending this prompt again]" in out.err.splitlines()
    rendered = plain_chat_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alone"}])
    assert out.out == TOK.decode(greedy(serve_run_config, rendered, 3)) + "\n"


def test_embed_on_a_lost_session_is_sent_again(worker_factory, serve_run_config, serve_config, tmp_path):
    import numpy as np

    from bifrost.tee.deploy import ServeApp
    from bifrost.tee.runtime import plaintext_embeddings

    from .conftest import worker_config

    _, _, endpoint = worker_factory("minilm", 64)
    cfg = serve_run_config.replace(model="minilm")
    app = ServeApp(cfg, serve_config.replace(replicas=2, **worker_config(endpoint, tmp_path))).start()
    try:
        c = connect(app)
        app.replicas[replica_of(app, c)].kill()
        texts = ["embedded after a loss"]
        got = c.embed(texts)  # stateless: always safe to send again
        want = plaintext_embeddings("minilm", cfg.seed, texts)
        cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert got.shape == want.shape and np.all(cos > 0.999) and c.session_losses == 1
        c.close()
    finally:
        app.stop()


class ForgingRelay(GrpcRelay):
    """A man in the middle without keys: ``forge`` set, the next Generate never reaches the server and is answered
    UNAVAILABLE with a forged session-lost marker of that value."""

    forge: str | None = None
    forge_after: bool = False  # forge the status after the whole answer instead (a drain's race with the last token)

    def generate(self, method, request, meta, context):
        forged, self.forge = self.forge, None
        if forged is None or self.forge_after:
            yield from super().generate(method, request, meta, context)
            if forged is None:
                return
        context.set_trailing_metadata(((SESSION_LOST_TRAILER, forged),))
        context.abort(grpc.StatusCode.UNAVAILABLE, "session lost: forged")


def test_a_forged_marker_never_reruns_a_turn_that_reads_history(app_factory, controlled_worker, serve_run_config):
    """The marker is cleartext. A forged one after a turn the caller stopped reading at its last event (the server
    committed it to the history) does not make the SDK send a history-reading turn again on a fresh session; the
    old session is closed on the server (nothing left behind); an unknown marker value is never passed on."""
    app = app_factory(worker=controlled_worker.endpoint, replicas=1)
    relay = ForgingRelay(f"127.0.0.1:{app.port}")
    try:
        c = BifrostClient(relay.address, make_policy(app.service.info.model_digest), timeout_s=120)
        c.attest()
        first = c.session_id
        for ev in c.generate("the first turn", 2):
            if ev.finish_reason:
                break  # stopped at the last event: the server holds the turn in the history
        relay.forge = "replica-lost"
        with pytest.raises(SessionLostError) as err:
            c.chat("reads the first turn", 2)
        e = err.value
        assert not e.partial and e.history_lost and e.reattested and c.session_id != first
        wait_until(lambda: app.service.sessions.get(first) is None and app.replicas[0].stats()["sessions"] == 1,
                   what="the old session to be closed on the server")
        # a status after the verified final chunk (a drain that stopped a turn as it ended) changes nothing
        relay.forge, relay.forge_after = "server-draining", True
        assert c.chat("whole answer", 3, reset_history=True).tokens == greedy(serve_run_config, "whole answer", 3)
        relay.forge_after = False
        losses: list[SessionLoss] = []
        c.on_session_lost = losses.append
        relay.forge = "please-print-me"  # (gRPC itself refuses control bytes in metadata)
        assert c.chat("standalone", 1, reset_history=True).tokens == greedy(serve_run_config, "standalone", 1)
        assert losses == [SessionLoss("unrecognized", history_lost=True, retried=True)]  # safe: sent again once
        c.close()
    finally:
        relay.stop()


def test_an_automatic_reattest_never_moves_to_another_serving_configuration(app_factory, controlled_worker,
                                                                            serve_run_config):
    """A policy that pins the model but not the serving configuration: after a (forged) loss, the new session
    must attest the same configuration as the lost one, else nothing is sent and the caller must attest()."""
    first = app_factory(worker=controlled_worker.endpoint, replicas=1)
    other = app_factory(worker=controlled_worker.endpoint, replicas=1, max_new_tokens=7)  # another config digest
    assert first.service.info.serving_config_digest != other.service.info.serving_config_digest
    relay = ForgingRelay(f"127.0.0.1:{first.port}")
    try:
        c = BifrostClient(relay.address, make_policy(first.service.info.model_digest), timeout_s=120)
        c.attest()
        relay.forge, relay.upstream = "replica-lost", f"127.0.0.1:{other.port}"  # the re-attest lands elsewhere
        with pytest.raises(SessionLostError) as err:
            c.chat("never sent", 2, reset_history=True)
        assert not err.value.reattested and "another model or serving configuration" in str(err.value)
        assert c.channel is None  # no session to send on until the caller attests
        wait_until(lambda: other.replicas[0].stats()["sessions"] == 0, what="the refused new session to be closed")
        c.attest()  # the caller's explicit choice
        assert c.chat("sent now", 2, reset_history=True).tokens == greedy(serve_run_config, "sent now", 2)
        c.close()
    finally:
        relay.stop()
