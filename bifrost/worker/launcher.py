"""Start a local worker process on loopback (the embedded default) and stop it again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..attest.mtls import WORKER_TLS_NAME, TLSIdentity, WorkerEndpoint
from ..errors import UnavailableError, UserError


class LocalWorker:
    """``bifrost worker`` as a child process on 127.0.0.1 with a free port. Use as a context manager.

    It gets a fresh TLS identity (in a private temporary folder) and trusts exactly the certificates in
    ``trusted_clients`` (PEM bytes: the trusted runtimes that will call it); :attr:`endpoint` is its address
    with its pinned certificate."""

    def __init__(self, model: str, seed: int, trusted_clients: list[bytes], config: str | None = None,
                 startup_timeout_s: float = 300.0, log_path: str | None = None, policy: str | None = None) -> None:
        """``policy``: the placement policy (its delegated layers are what the worker serves; default: the
        config's)."""
        if not trusted_clients:
            raise UserError("a local worker needs the certificate of the trusted runtime that will call it")
        self.model, self.seed, self.config, self.policy = model, seed, config, policy
        self.timeout = startup_timeout_s
        self._dir = tempfile.mkdtemp(prefix="bifrost-worker-")
        self.log_path = log_path or os.path.join(self._dir, "worker.log")
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self._identity_dir = os.path.join(self._dir, "identity")
        self.identity = TLSIdentity.generate(WORKER_TLS_NAME)
        self.identity.save(self._identity_dir)
        self._trusted = []
        for i, pem in enumerate(trusted_clients):
            path = os.path.join(self._dir, f"trusted-{i}.pem")
            Path(path).write_bytes(pem)
            self._trusted.append(path)

    @property
    def endpoint(self) -> WorkerEndpoint:
        if self.address is None:
            raise UnavailableError("the local worker is not running")
        return WorkerEndpoint(self.address, self.identity.cert_pem)

    def start(self) -> "LocalWorker":
        port_file = os.path.join(self._dir, "port")
        cmd = [sys.executable, "-m", "bifrost.worker", "--host", "127.0.0.1", "--port", "0",
               "--port-file", port_file, "--model", self.model, "--seed", str(self.seed), "--exit-with-parent",
               "--identity", self._identity_dir]
        for path in self._trusted:
            cmd += ["--trusted-client", path]
        if self.config:
            cmd += ["--config", str(self.config)]
        if self.policy:
            cmd += ["--policy", self.policy]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if os.path.exists(port_file):
                self.address = f"127.0.0.1:{Path(port_file).read_text().strip()}"
                return self
            if self.proc.poll() is not None:
                tail = Path(self.log_path).read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise UnavailableError(f"local worker exited with code {self.proc.returncode}: {tail[0]}")
            time.sleep(0.05)
        self.stop()
        raise UnavailableError(f"local worker did not start within {self.timeout:.0f} s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self._identity_dir, ignore_errors=True)  # the worker's private key

    def __enter__(self) -> "LocalWorker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
