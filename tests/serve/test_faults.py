"""Fault injection on real processes and sockets (issue 25, item 3): workers killed, hung, slow or behind a
connection-resetting path, a run folder on a full disk, a client that vanishes mid-stream.

Every case asserts what the client saw (no error, or a clear status), that every token stream it got equals
the plaintext model's (never wrong, never silently truncated), that the system recovers (the faulty worker
serves again once healed, or the sessions go on), that no availability fault quarantines anyone, and that no
secret (prompt, bearer token) reaches the logs. Each case also measures its recovery time for the report
(``BIFROST_FAULT_REPORT=path``: JSON rows); no test asserts on a time (timeouts are hang guards only).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bifrost.model.tokenizer import ByteTokenizer

from tests.netfault import Link, Relay

from .conftest import MODEL, connect, plaintext_greedy, report, wait_until

PROMPT = "Fault line: the quiet heron"  # a marker: must never appear in a log


# --------------------------------------------------------------------------- helpers
def expected(prompt: str, n: int, seed: int) -> list[int]:
    return plaintext_greedy(MODEL, seed, ByteTokenizer().encode(prompt), n)


def assert_no_secrets(text: str, *secrets: str) -> None:
    for s in secrets:
        assert s and s not in text, "a secret reached a log"


class Streamer(threading.Thread):
    """One client session generating turn after turn (each ``reset_history``, so each equals plaintext from the
    prompt) until :meth:`finish`; keeps every finished turn's tokens, each token's arrival time and any error."""

    def __init__(self, app, prompt: str = PROMPT, n: int = 16) -> None:
        super().__init__(daemon=True)
        self.client = connect(app)
        self.prompt, self.n = prompt, n
        self.turns: list[list[int]] = []
        self.arrivals: list[float] = []
        self.errors: list[BaseException] = []
        self._stop_after_turn = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_after_turn.is_set():
                tokens: list[int] = []
                for ev in self.client.generate(self.prompt, self.n, reset_history=True):
                    tokens += ev.token_ids
                    self.arrivals.extend([time.monotonic()] * len(ev.token_ids))
                self.turns.append(tokens)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def first_token_after(self, t: float) -> float | None:
        return next((a for a in list(self.arrivals) if a > t), None)

    def finish(self, min_turns: int = 1) -> None:
        """Let it finish at least ``min_turns`` turns (the running one included), then stop after a turn."""
        wait_until(lambda: len(self.turns) >= min_turns or bool(self.errors), 240, "turns to finish")
        self._stop_after_turn.set()
        self.join(240)
        assert not self.is_alive(), "the stream hung"
        self.client.close()


def pin_in_flight(pool, address: str, pid: int, timeout_s: float = 60.0) -> None:
    """SIGSTOP worker process ``pid`` at a moment when ``pool`` has a layer call in flight to it, and make sure
    that call is stuck there (still in flight 0.3 s later: a stopped process cannot answer)."""
    worker = next(w for w in pool.workers if w.address == address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.inflight > 0:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.3)
            if worker.inflight > 0:
                return
            os.kill(pid, signal.SIGCONT)  # the reply had left already: try the next call
        time.sleep(0.0005)
    pytest.fail("never caught a layer call in flight to the worker")


def workers_config(endpoints, folder: Path) -> dict:
    """serve-config overrides: these workers, each certificate pinned."""
    certs = []
    for e in endpoints:
        cert = folder / f"worker-{e.address.replace(':', '_')}.pem"
        cert.write_bytes(e.cert_pem)
        certs.append(str(cert))
    return {"workers": tuple(e.address for e in endpoints), "worker_certs": tuple(certs)}


def read_logs(app) -> str:
    return "\n".join(p.read_text(errors="replace") for p in Path(app.run_dir).glob("*.log"))


@pytest.fixture()
def serve_app(app_factory, tmp_path):
    """``app_factory`` with this test's own quarantine file (what a fault leaves there is this test's alone)."""
    return lambda **changes: app_factory(**{"quarantine_file": str(tmp_path / "quarantine.json"), **changes})


def quarantined(app) -> list:
    from bifrost.tee.pool import WorkerQuarantine

    replica = app.replicas[0].obj
    replica.runtime.quarantine.flush()
    return replica.stats()["quarantined_workers"] + sorted(WorkerQuarantine(app.scfg.quarantine_file).entries())


def stream_and_stop_in_a_call(app):
    """A session streaming 16-token turns on ``app`` (2 local worker processes) and, once it has tokens, local
    worker 0 SIGSTOPped with a layer call in flight to it (:func:`pin_in_flight`). Returns (pool, victim, streamer)."""
    pool, victim = app.replicas[0].obj.pool, app.local_workers[0]
    s = Streamer(app, n=16)
    s.start()
    wait_until(lambda: len(s.arrivals) >= 2 or bool(s.errors), 120, "the first tokens")
    pin_in_flight(pool, victim.address, victim.proc.pid)
    return pool, victim, s


# --------------------------------------------------------------------------- 1. SIGKILL during a layer call
def test_worker_process_sigkilled_during_a_layer_call(serve_app, serve_run_config, fault_report, caplog):
    """A worker process SIGKILLed while a layer call is in flight to it (the moment is pinned: SIGSTOP while the
    pool has a call out to it, confirmed stuck, then SIGKILL): that call moves to the other worker; the stream
    goes on with no error and plaintext tokens, later sessions are served, nobody is quarantined."""
    caplog.set_level(logging.INFO)
    app = serve_app(workers=(), local_workers=2, worker_retry_after_s=600)
    pool, victim, s = stream_and_stop_in_a_call(app)
    failovers = pool.stats.failovers
    t_fault = time.monotonic()
    victim.proc.kill()
    victim.proc.wait()
    wait_until(lambda: s.first_token_after(t_fault) is not None or bool(s.errors), 120, "a token after the kill")
    s.finish(min_turns=2)
    assert not s.errors
    want = expected(PROMPT, 16, serve_run_config.seed)
    correct = all(t == want for t in s.turns)
    first_after = s.first_token_after(t_fault)
    report(fault_report, "worker SIGKILLed during a layer call", "no error", correct,
           None if first_after is None else first_after - t_fault, "kill -> next token")
    assert correct and len(s.turns) >= 2
    assert pool.stats.failovers > failovers  # the call in flight at the kill moved
    assert [w["up"] for w in pool.snapshot()] == [False, True]
    with connect(app) as late:  # a session started after the kill is served
        assert late.chat(PROMPT, 3, reset_history=True).tokens == want[:3]
        assert_no_secrets(caplog.text + read_logs(app), PROMPT, late.token)
    assert quarantined(app) == []


# --------------------------------------------------------------------------- 2. SIGSTOP (hang), then SIGCONT
def test_worker_process_hung_by_sigstop_fails_over_and_serves_again_after_sigcont(
        serve_app, serve_run_config, fault_report, caplog):
    """A worker process stopped (hung) with a call in flight: the call times out after worker_call_timeout_s and
    moves; once the process is continued it serves calls again (after worker_retry_after_s). No error, tokens
    plaintext, nobody quarantined."""
    caplog.set_level(logging.INFO)
    app = serve_app(workers=(), local_workers=2, worker_call_timeout_s=4.0, worker_retry_after_s=1.0)
    pool, victim, s = stream_and_stop_in_a_call(app)
    t_stop = time.monotonic()
    try:
        wait_until(lambda: pool.stats.failovers >= 1, 60, "the hung call to time out and move")
        wait_until(lambda: s.first_token_after(t_stop) is not None or bool(s.errors), 60, "a token after the hang")
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    t_cont = time.monotonic()
    served = pool.stats.calls_by_worker.get(victim.address, 0)
    wait_until(lambda: pool.stats.calls_by_worker.get(victim.address, 0) > served or bool(s.errors), 120,
               "the continued worker to serve a call again")
    t_back = time.monotonic()
    s.finish(min_turns=len(s.turns) + 1)
    assert not s.errors
    want = expected(PROMPT, 16, serve_run_config.seed)
    correct = all(t == want for t in s.turns)
    first_after = s.first_token_after(t_stop)
    report(fault_report, "worker SIGSTOPped (hung) mid-call, timeout 4 s", "no error (a stall)", correct,
           None if first_after is None else first_after - t_stop, "stop -> next token")
    report(fault_report, "hung worker SIGCONTed, retry_after 1 s", "no error", correct, t_back - t_cont,
           "SIGCONT -> the worker serves a call again")
    assert correct
    assert victim.proc.poll() is None and pool.snapshot()[0]["up"]
    assert_no_secrets(caplog.text + read_logs(app), PROMPT, s.client.token or "?")
    assert quarantined(app) == []


# --------------------------------------------------------------------------- 3. a worker 10x slower
class SlowableWorker:
    """A real in-process CKKS worker (mutual TLS, real socket) whose layer calls take ``factor`` times as long as
    they would (after each it sleeps (factor - 1) x its own compute time); records when each call arrived."""

    def __init__(self, run_config) -> None:
        from tests.workers import make_service, start_worker

        self.factor = 1.0
        self.arrived: list[float] = []
        service = make_service(run_config, MODEL, 64, 2**30)
        lock = threading.Lock()

        def slowed(inner):
            def call(request, context):
                with lock:
                    self.arrived.append(time.monotonic())
                t0 = time.monotonic()
                reply = inner(request, context)
                time.sleep((self.factor - 1) * (time.monotonic() - t0))
                return reply
            return call

        for name in ("Linear", "LinearBatch"):
            setattr(service, name, slowed(getattr(service, name)))
        _, self.server, self.endpoint = start_worker(run_config, MODEL, service=service)

    @property
    def calls(self) -> int:
        return len(self.arrived)

    def stop(self) -> None:
        self.server.stop(grace=None)


def test_a_worker_ten_times_slower_gets_few_calls_and_is_used_again_once_fast(
        serve_app, run_config, serve_run_config, tmp_path, fault_report):
    """Two workers, one 10x slower: most calls go to the fast one (round-robin would give the slow one every
    other call); once it is fast again the pool's probes find it and it takes its share again. Counted in
    calls, never timed."""
    slow, fast = SlowableWorker(run_config), SlowableWorker(run_config)
    try:
        slow.factor = 10.0
        app = serve_app(**workers_config([slow.endpoint, fast.endpoint], tmp_path))
        want = expected(PROMPT, 24, serve_run_config.seed)
        with connect(app) as c:
            before = (slow.calls, fast.calls)
            first = c.chat(PROMPT, 24, reset_history=True).tokens
            slow_share = (slow.calls - before[0]) / max(1, slow.calls + fast.calls - sum(before))
            slow.factor = 1.0
            t_heal = time.monotonic()
            before = (slow.calls, fast.calls)
            later = [c.chat(PROMPT, 24, reset_history=True).tokens for _ in range(2)]
            healed_share = (slow.calls - before[0]) / max(1, slow.calls + fast.calls - sum(before))
        back = next((t for t in slow.arrived if t > t_heal), None)
        correct = first == want and all(t == want for t in later)
        report(fault_report, f"worker 10x slower (its share of calls: {slow_share:.0%}; once healed: "
               f"{healed_share:.0%})", "no error", correct, None if back is None else back - t_heal,
               "healed -> its next call")
        assert correct
        assert slow_share < 0.25  # round-robin: 0.5
        assert healed_share > 0.25  # probed, found fast, back in the rotation
        assert quarantined(app) == []
    finally:
        slow.stop()
        fast.stop()


# --------------------------------------------------------------------------- 4. a path that resets connections
class ResetRelay(Relay):
    """A raw TCP relay in front of a worker, with no keys. While ``resetting`` it aborts with a TCP RST every
    ``every``-th connection that carries a layer call, at the reply: the worker computed it, the caller gets a reset
    connection. What anyone on the path can do. ``passed`` holds when each reply went through."""

    BIG = 8192  # a client->server chunk this large is a layer call (or a worker session's public context)

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.resetting, self.every = False, 1
        self.resets = self._calls = 0
        self.passed: list[float] = []
        self._armed: set[Link] = set()  # a call went up this connection and its reply is due

    def forward(self, link: Link, chunk: bytes, from_server: bool) -> bytes | None:
        with self._lock:
            if not from_server:
                if len(chunk) >= self.BIG:
                    self._armed.add(link)
                return chunk
            if link not in self._armed:
                return chunk
            self._armed.discard(link)
            self._calls += 1
            reset = self.resetting and self._calls % self.every == 0
            self.resets += reset
            if not reset:
                self.passed.append(time.monotonic())
        return None if reset else chunk  # None: the reply is dropped, both sides get a RST


def test_a_path_that_resets_connections_quarantines_no_one(serve_app, worker_factory, controlled_worker,
                                                           serve_run_config, tmp_path, fault_report, caplog):
    """A relay RSTs connections to an honest worker, some of the time, then all of the time: the calls move to
    the other worker, the tokens are plaintext's, no error reaches the client, the worker is NOT quarantined (an
    outsider must not get an honest worker banned), and once the path heals it serves again."""
    caplog.set_level(logging.INFO)
    _, _, endpoint = worker_factory(MODEL, 64)
    relay = ResetRelay(endpoint.address)
    try:
        from bifrost.attest.mtls import WorkerEndpoint

        via_relay = WorkerEndpoint(relay.address, endpoint.cert_pem)
        app = serve_app(worker_retry_after_s=0.5,
                        **workers_config([via_relay, controlled_worker.endpoint], tmp_path))
        pool = app.replicas[0].obj.pool
        want = expected(PROMPT, 16, serve_run_config.seed)
        with connect(app) as c:
            turns = [c.chat(PROMPT, 16, reset_history=True).tokens]
            assert pool.stats.calls_by_worker.get(relay.address, 0) > 0  # the path works before the fault
            relay.resetting, relay.every = True, 3  # some of the time
            turns.append(c.chat(PROMPT, 16, reset_history=True).tokens)
            some = relay.resets
            relay.every = 1  # all of the time
            turns.append(c.chat(PROMPT, 16, reset_history=True).tokens)
            relay.resetting = False
            t_heal = time.monotonic()
            served = pool.stats.calls_by_worker.get(relay.address, 0)
            for _ in range(20):  # (hang guard) until the healed path carries a call
                turns.append(c.chat(PROMPT, 16, reset_history=True).tokens)
                if pool.stats.calls_by_worker.get(relay.address, 0) > served:
                    break
            t_back = next((t for t in relay.passed if t > t_heal), None)
            assert_no_secrets(caplog.text + read_logs(app), PROMPT, c.token)
        correct = all(t == want for t in turns)
        report(fault_report, "connection resets on the path (1 in 3, then all)", "no error", correct,
               None if t_back is None else t_back - t_heal, "path healed -> a reply passes again")
        assert correct
        assert some >= 1 and relay.resets > some and pool.stats.failovers >= relay.resets
        assert t_back is not None, "the worker was not used again once the path healed"
        assert quarantined(app) == []  # availability only
    finally:
        relay.close()


# --------------------------------------------------------------------------- 5. the run folder's disk is full
def _in_full_tmpfs(mount: Path, command: list[str], size: str, fill: bool) -> list[str]:
    """``command`` in a private user+mount namespace where ``mount`` is a tmpfs of ``size`` (filled up first
    when ``fill``): a real ENOSPC without root."""
    script = f'mount -t tmpfs -o size={size} tmpfs "{mount}" || exit 99; '
    if fill:
        script += f'dd if=/dev/zero of="{mount}/filler" bs=4k 2>/dev/null; '
    script += 'exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command]


@pytest.fixture(scope="module")
def namespaces():
    try:
        ok = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                            timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("unprivileged user+mount namespaces are not available here (no way to get a real ENOSPC)")


QUARANTINE_ON_FULL_DISK = """
import json, logging, os, sys
from bifrost.tee.pool import WorkerQuarantine
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
path = sys.argv[1]
q = WorkerQuarantine(path)
identity = "sha256:" + "ab" * 32
new = q.add(identity, "product")
q.flush()
print(json.dumps({"new": new, "held": identity in q, "held_again": identity in q, "count": len(q),
                  "files": sorted(os.listdir(os.path.dirname(path)))}))
"""


def test_a_quarantine_file_write_on_a_full_disk_keeps_the_quarantine(namespaces, tmp_path, fault_report):
    """The quarantine file cannot be written (ENOSPC): the identity stays quarantined in the process, one clear
    error line says the file was not written, the operator's warning still comes, no traceback, no partial file."""
    mount = tmp_path / "full"
    mount.mkdir()
    proc = subprocess.run(_in_full_tmpfs(mount, [sys.executable, "-c", QUARANTINE_ON_FULL_DISK,
                                                 str(mount / "quarantine.json")], "64k", fill=True),
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.splitlines()
    not_written = [ln for ln in lines if "not written" in ln]
    report(fault_report, "quarantine file on a full disk", "n/a (no client)", None, None,
           "identity held in memory: " + str(out["held"]))
    assert out["new"] and out["held"] and out["held_again"] and out["count"] == 1
    assert len(not_written) == 1 and "No space left on device" in not_written[0]
    assert any("quarantined" in ln and "WARNING" in ln for ln in lines)
    assert "Traceback" not in proc.stderr
    assert not [f for f in out["files"] if f.endswith(".tmp") or f == "quarantine.json"]


def test_bifrost_serve_keeps_serving_when_its_run_folder_fills_up(namespaces, serve_run_config, tmp_path,
                                                                  fault_report):
    """``bifrost serve`` (a real process, runtime local, one local worker process) whose run folder's disk fills
    up while it serves: requests go on (tokens plaintext's, no error), serve.log failing is one line on stderr,
    no traceback, the worker lives; when space comes back, serve.log is written again. A serve started on a full
    disk fails at once with a one-line error."""
    import yaml

    from bifrost.attest.policy import policy_from_mapping
    from bifrost.model.catalog import resolve
    from bifrost.model.digests import model_digest
    from bifrost.serve.client import BifrostClient

    mount = tmp_path / "full"
    mount.mkdir()
    root = Path(__file__).parents[2]
    scfg = yaml.safe_load((root / "configs" / "serve.yaml").read_text())
    scfg.update(runtime="local", evidence_provider="simulated", quarantine_file=str(mount / "quarantine.json"),
                max_sessions=4, local_workers=1, workers=[], worker_certs=[])
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(scfg))
    port_file = tmp_path / "port"
    serve = [sys.executable, "-m", "bifrost.cli", "serve", "--serve-config", str(tmp_path / "serve.yaml"),
             "--model", MODEL, "--seed", str(serve_run_config.seed), "--port", "0", "--port-file", str(port_file),
             "--run-dir", str(mount / "run")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # started on a full disk: a clear one-line error at start
    full = subprocess.run(_in_full_tmpfs(mount, serve, "1m", fill=True), capture_output=True, text=True,
                          timeout=300, cwd=root, env=env)
    assert full.returncode != 0 and "No space left on device" in full.stderr
    assert "Traceback" not in full.stderr and not port_file.exists()

    # fills up while serving
    stderr_path = tmp_path / "serve.stderr"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(_in_full_tmpfs(mount, serve, "4m", fill=False), stdout=subprocess.DEVNULL,
                                stderr=err, cwd=root, env=env)
    try:
        wait_until(lambda: port_file.exists() or proc.poll() is not None, 300, "bifrost serve to start")
        assert proc.poll() is None, stderr_path.read_text()[-2000:]
        inside = Path(f"/proc/{proc.pid}/root") / str(mount).lstrip("/")
        policy = policy_from_mapping({"allow_simulated": True,
                                      "model_digests": [model_digest(resolve(MODEL), serve_run_config.seed).hex()]})
        want = expected(PROMPT, 6, serve_run_config.seed)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        tokens = []

        def session_turn() -> list[int]:
            with BifrostClient(address, policy, timeout_s=120) as c:
                c.attest()  # a new session: the front end, the replica and the worker each log a line
                tokens.append(c.token)
                return c.chat(PROMPT, 6, reset_history=True).tokens

        assert session_turn() == want
        log = inside / "run" / "serve.log"
        with open(log, "a") as f:  # end serve.log on a page boundary, so that its next record needs a new page
            f.write("#" * (-(log.stat().st_size + 1) % 4096) + "\n")
        with open(inside / "filler", "wb") as f:  # the disk fills up
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC
        t_full = time.monotonic()
        during = [session_turn() for _ in range(3)]
        recovery = time.monotonic() - t_full
        os.unlink(inside / "filler")  # space comes back
        log_size = log.stat().st_size
        after = session_turn()
        wait_until(lambda: log.stat().st_size > log_size, 30, "serve.log to be written again")
        workers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == proc.pid
                   and b"bifrost.worker" in _cmdline(p)]
        correct = all(t == want for t in during) and after == want
        report(fault_report, "run folder's disk full while serving", "no error", correct, recovery / 3,
               "mean turn time (new session each) on the full disk: serving never stopped")
        assert correct
        assert len(workers) == 1  # the local worker survived its own log failing
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr = stderr_path.read_text()
    assert "Traceback" not in stderr and "Logging error" not in stderr
    assert stderr.count("cannot write") == 1 and "serve.log (No space left on device)" in stderr
    assert "marked down" not in stderr  # the worker kept answering
    assert_no_secrets(stderr, PROMPT, *tokens)


def _ppid(p: Path) -> int:
    try:
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


# --------------------------------------------------------------------------- 6. a client vanishes mid-stream
CLIENT = """
import sys
from bifrost.attest.policy import policy_from_mapping
from bifrost.serve.client import BifrostClient
address, digest, prompt, n = sys.argv[1:5]
c = BifrostClient(address, policy_from_mapping({"allow_simulated": True, "model_digests": [digest]}), timeout_s=120)
c.attest()
print("session", c.session_id.hex(), flush=True)
for ev in c.generate(prompt, int(n)):
    print("token", *ev.token_ids, flush=True)
"""


def test_a_client_process_killed_mid_stream_frees_its_turn_and_others_do_not_notice(
        serve_app, controlled_worker, serve_run_config, tmp_path, fault_report, caplog):
    """A client process SIGKILLed mid-stream (its connection just drops) while another session streams on the
    same replica (their decode steps share batched worker calls): its turn stops, its session and CKKS worker
    session are released (idle expiry) while the other goes on, and the other session gets every token,
    plaintext's, with no error."""
    caplog.set_level(logging.INFO)
    controlled_worker.delay_s = 0.03  # a token takes >= 0.24 s: the streams overlap whatever the machine speed
    app = serve_app(session_idle_s=3.0, **workers_config([controlled_worker.endpoint], tmp_path))
    replica = app.replicas[0].obj
    baseline = controlled_worker.worker_sessions()  # the replica runtime's own worker session
    victim = subprocess.Popen([sys.executable, "-c", CLIENT, f"127.0.0.1:{app.port}",
                               app.service.info.model_digest.hex(), "vanishing client", "32"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=Path(__file__).parents[2])
    other = None
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(victim.stdout.readline, "")), daemon=True)
        reader.start()

        def victim_tokens() -> int:
            return sum(ln.startswith("token") for ln in list(lines))

        wait_until(lambda: victim_tokens() >= 1 or victim.poll() is not None, 120, "the doomed client's first token")
        other = Streamer(app, n=12)
        other.start()
        wait_until(lambda: (len(other.arrivals) >= 1 and victim_tokens() >= 2) or bool(other.errors)
                   or victim.poll() is not None, 120, "both streams running")
        assert victim.poll() is None and not other.errors
        t_kill = time.monotonic()
        victim.kill()
        victim.wait()
        wait_until(lambda: replica.stats()["turns_cancelled"] >= 1, 60, "the vanished client's turn to stop")
        t_stopped = time.monotonic()
        # the other session keeps streaming meanwhile (so it never idles out)
        wait_until(lambda: len(app.service.sessions) == 1 and replica.stats()["sessions"] == 1
                   and controlled_worker.worker_sessions() == baseline + 1, 60,
                   "the vanished session and its worker session to be released")
        t_released = time.monotonic()
        other.finish(min_turns=len(other.turns) + 1)
        assert not other.errors
        want = expected(PROMPT, 12, serve_run_config.seed)
        correct = bool(other.turns) and all(t == want for t in other.turns)
        report(fault_report, "client process SIGKILLed mid-stream (another session streaming)",
               "the other session: no error", correct, t_stopped - t_kill, "kill -> its turn stopped")
        report(fault_report, "  (same) its session and worker session released (session_idle_s 3)", "-", correct,
               t_released - t_kill, "kill -> released")
        assert correct
        assert_no_secrets(caplog.text + read_logs(app), PROMPT, "vanishing client", other.client.token or "?")
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
