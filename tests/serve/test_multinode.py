"""A real two-node Ray cluster on this machine, started as an operator would (``ray start --head`` and
``ray start --address``, each node its own resources, token auth with the token file given by path, the temp
dir outside ~/.ray and /tmp/ray): the deployment joins it (``ray_address``), its two replicas sit on both
nodes (SPREAD), and SIGKILLing the second node's processes mid-stream ends that node's streams with the
session-lost status while the other node's stream continues plaintext-equal; the SDK then attests onto the
surviving replica and a turn that is safe to send again is answered plaintext-equal. Every Ray process of the
cluster is gone afterwards."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bifrost.model.tokenizer import ByteTokenizer
from bifrost.serve.client import SessionLostError

from .conftest import (MODEL, ControlledWorker, connect, plaintext_greedy, ray_default_dirs_listing, report,
                       wait_until)

import ray  # noqa: E402 - a hard dependency

RAY = str(Path(sys.executable).parent / "ray")
# Ray marks a node dead after health_check_failure_threshold failed checks health_check_period_ms apart
# (defaults 5 x 3000 ms); shortened here the way an operator would (README, "Cluster (multi-node Ray)")
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                 "health_check_timeout_ms": 1000}
TOK = ByteTokenizer()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Each node's own ports (two nodes share this host): none left to Ray's fixed defaults."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


@dataclass
class Cluster:
    root: Path                  # short (Ray's unix sockets live below it): temp dir, token, logs
    port: int                   # the head's GCS port
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # each `ray start --block`, own group

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats",
                                             "--include-log-monitor", "false", *args], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-2000:]

    def kill(self, name: str) -> None:
        """SIGKILL a node: its ``ray start`` and everything in its process group (raylet, agents, workers)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def leftovers(self) -> list[int]:
        """Processes (other than this one) whose command line names this cluster's folder."""
        mine = str(self.root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mine in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found


def gcs_listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    """Head (resource ``head_node``) and a second node (``second_node``), 2 CPUs each; torn down whatever happens."""
    before = ray_default_dirs_listing()
    root = Path(tempfile.mkdtemp(prefix="bfm-", dir="/tmp"))
    token = root / "ray-auth-token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing from another test's Ray
    c = Cluster(root, free_port(), dict(env, RAY_USAGE_STATS_ENABLED="0", **auth))
    saved = {k: os.environ.get(k) for k in auth}
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # not in ray's stubs

    def reload_ray_settings() -> None:
        """Ray caches its config and its auth token per process (another test's Ray may have loaded its own)."""
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    try:
        c.start("head", ["--head", "--port", str(c.port), "--ray-client-server-port", str(free_port()),
                         "--include-dashboard", "false", "--temp-dir", str(root / "ray"), "--num-cpus", "2",
                         "--resources", json.dumps({"head_node": 1}), "--system-config", json.dumps(SYSTEM_CONFIG),
                         *node_ports()])
        wait_until(lambda: gcs_listening(c.port) or c.procs["head"].poll() is not None, 120, "the head's GCS port")
        if c.procs["head"].poll() is not None:
            pytest.fail("ray start --head exited: " + c.log("head"))
        c.start("second", ["--address", c.address, "--num-cpus", "2", "--resources",
                           json.dumps({"second_node": 1}), *node_ports()])
        os.environ.update(auth)  # this process (the deployment) joins with the same token
        reload_ray_settings()
        yield c
    finally:
        for name in ("second", "head"):
            if name in c.procs:
                c.kill(name)
        for pid in c.leftovers():  # anything that left its node's process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not c.leftovers(), 30, "the cluster's processes to exit")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_ray_settings()
        shutil.rmtree(root, ignore_errors=True)
    assert ray_default_dirs_listing() == before  # nothing in ~/.ray or /tmp/ray


@pytest.fixture(scope="module")
def served(cluster, run_config, serve_run_config, serve_config, tmp_path_factory):
    """The deployment on the cluster: 2 replicas, 2 in-process CKKS workers given by address."""
    from bifrost.tee.deploy import ServeApp

    workers = [ControlledWorker(run_config), ControlledWorker(run_config)]
    certs = tmp_path_factory.mktemp("mn-certs")
    for i, w in enumerate(workers):
        (certs / f"w{i}.pem").write_bytes(w.endpoint.cert_pem)
    app = None
    try:
        wait_until(lambda: gcs_listening(cluster.port), 120, "the head")
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 2 or cluster.procs["second"].poll() is not None,
                   120, "both nodes to join")  # (the app uses this Ray)
        if sum(n["Alive"] for n in ray.nodes()) != 2:
            pytest.fail("the second node did not join: " + cluster.log("second"))
        app = ServeApp(serve_run_config, serve_config.replace(
            runtime="ray", ray_address=cluster.address, replicas=2, replica_cpus=1,
            workers=tuple(w.address for w in workers), worker_certs=tuple(str(certs / f"w{i}.pem") for i in range(2))),
            run_dir=tmp_path_factory.mktemp("mn-run")).start()
        yield app, workers
    finally:
        if app is not None:
            app.stop()
        if ray.is_initialized():
            ray.shutdown()
        for w in workers:
            w.stop()


def node_ids() -> dict[str, str]:
    """Node id by the custom resource that names the node."""
    out = {}
    for n in ray.nodes():
        for name in ("head_node", "second_node"):
            if name in n["Resources"]:
                out[name] = n["NodeID"]
    return out


def greedy(run_config, text: str, n: int) -> list[int]:
    return plaintext_greedy(MODEL, run_config.seed, TOK.encode(text), n)


def test_replicas_are_spread_over_both_nodes(served):
    app, _ = served
    placed = [r.stats()["node_id"] for r in app.replicas]
    assert sorted(placed) == sorted(node_ids().values())  # one replica on each node


def _bifrost(*args: str) -> list[str]:
    return [sys.executable, "-m", "bifrost.cli", *args]


def _started(proc: subprocess.Popen, port_file: Path, log: Path, what: str) -> str:
    """``127.0.0.1:<port>`` once ``proc`` wrote its port file (hang guard: 240 s)."""
    wait_until(lambda: port_file.exists() or proc.poll() is not None, 240, what)
    if proc.poll() is not None:
        pytest.fail(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
    return f"127.0.0.1:{port_file.read_text().strip()}"


def test_the_readme_commands_serve_on_the_cluster(served, cluster, serve_run_config, tmp_path):
    """The README's operator steps on this cluster, as processes: `bifrost identity create` (the runtimes'
    identity), `bifrost worker` trusting it, `bifrost serve --print-digests --policy-out` (the client's policy),
    `bifrost serve --ray-address ... --identity ... --workers ... --worker-certs ...` (2 replicas, one per node),
    `bifrost chat --policy`; the SDK's tokens equal plaintext; SIGTERM drains and exits 0."""
    from bifrost.attest.policy import load_policy
    from bifrost.serve.client import BifrostClient

    env = dict(cluster.env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = lambda *a: subprocess.run(_bifrost(*a), env=env, capture_output=True, text=True, timeout=240)  # noqa: E731
    made = run("identity", "create", str(tmp_path / "tee-id"))
    assert made.returncode == 0, made.stderr
    procs = []
    try:
        wlog = tmp_path / "worker.log"
        procs.append(subprocess.Popen(_bifrost(
            "worker", "--model", MODEL, "--seed", str(serve_run_config.seed), "--port", "0", "--port-file",
            str(tmp_path / "worker.port"), "--identity", str(tmp_path / "w1"), "--trusted-client",
            str(tmp_path / "tee-id" / "cert.pem")), env=env, stdout=subprocess.DEVNULL, stderr=open(wlog, "wb")))
        worker = _started(procs[-1], tmp_path / "worker.port", wlog, "bifrost worker")
        serve = ["serve", "--model", MODEL, "--seed", str(serve_run_config.seed), "--runtime", "ray",
                 "--ray-address", cluster.address, "--replicas", "2", "--identity", str(tmp_path / "tee-id"),
                 "--workers", worker, "--worker-certs", str(tmp_path / "w1" / "cert.pem"), "--evidence", "simulated"]
        digests = run(*serve, "--print-digests", "--policy-out", str(tmp_path / "policy.yaml"))
        assert digests.returncode == 0, digests.stderr
        slog = tmp_path / "serve.log"
        procs.append(subprocess.Popen(_bifrost(*serve, "--port", "0", "--port-file", str(tmp_path / "serve.port"),
                                               "--run-dir", str(tmp_path / "run")),
                                      env=env, stdout=subprocess.DEVNULL, stderr=open(slog, "wb")))
        address = _started(procs[-1], tmp_path / "serve.port", slog, "bifrost serve --ray-address")
        chat = run("chat", "--address", address, "--policy", str(tmp_path / "policy.yaml"), "--prompt", "cluster",
                   "--max-new-tokens", "3")
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        with BifrostClient(address, load_policy(str(tmp_path / "policy.yaml")), timeout_s=120) as c:
            c.attest()
            assert c.chat("on the cluster", 4).tokens == greedy(serve_run_config, "on the cluster", 4)
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(timeout=120) == 0, slog.read_text(errors="replace")[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_second_node_killed_mid_stream(served, cluster, serve_run_config, fault_report):
    app, workers = served
    on_node = {r.stats()["node_id"]: i for i, r in enumerate(app.replicas)}
    survivor, doomed = on_node[node_ids()["head_node"]], on_node[node_ids()["second_node"]]
    clients = [connect(app), connect(app)]
    by_replica = {app.service.sessions.get(c.session_id).replica: c for c in clients}
    assert set(by_replica) == {survivor, doomed}
    while True:  # a session on the doomed replica that has not run a turn yet (safe to send again)
        spare = connect(app)
        clients.append(spare)
        if app.service.sessions.get(spare.session_id).replica == doomed:
            break
        assert len(clients) < 6
    for w in workers:
        w.delay_s = 0.03  # the turns are still running when the node goes
    n = 16
    kept, lost = by_replica[survivor].generate("on the head node", n), by_replica[doomed].generate("on the lost node", n)
    kept_tokens, lost_tokens = list(next(kept).token_ids), list(next(lost).token_ids)
    killed_at = time.monotonic()
    cluster.kill("second")
    with pytest.raises(SessionLostError) as err:  # (the client's timeout_s=120 is the hang guard)
        for ev in lost:
            lost_tokens += ev.token_ids
    ended_after = time.monotonic() - killed_at
    for ev in kept:
        kept_tokens += ev.token_ids
    for w in workers:
        w.delay_s = 0.0
    print(f"\nthe lost node's stream ended {ended_after:.1f} s after SIGKILL ({len(lost_tokens)} tokens streamed)")
    assert kept_tokens == greedy(serve_run_config, "on the head node", n)
    e = err.value
    assert e.session_lost == "replica-lost" and e.partial and e.reattested
    assert lost_tokens == greedy(serve_run_config, "on the lost node", n)[:len(lost_tokens)] and len(lost_tokens) < n
    assert app.service.sessions.get(by_replica[doomed].session_id).replica == survivor
    # a session on the lost node that had not run a turn: re-attested and answered on the survivor
    assert spare.chat("sent again", 4).tokens == greedy(serve_run_config, "sent again", 4)
    recovered = time.monotonic() - killed_at
    assert spare.session_losses == 1 and app.service.sessions.get(spare.session_id).replica == survivor
    assert by_replica[doomed].chat("continues anew", 3, reset_history=True).tokens == greedy(
        serve_run_config, "continues anew", 3)
    wait_until(lambda: app.service.sessions.live_replicas() == [survivor], 120, "Ray to report the lost node's replica dead")
    report(fault_report, "a Ray node SIGKILLed mid-stream (its replica with it)",
           f"that node's stream: SessionLostError(replica-lost, partial) {ended_after:.1f} s after the kill; the "
           "other node's stream: no error", True, recovered,
           "kill -> a session of the lost node answered again on the other node")
    for c in clients:
        c.close()
