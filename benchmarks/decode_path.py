"""Which files and functions of Bifrost one decoded token crosses, from the Generate RPC to the worker call.

A real in-process serving stack (gRPC front end, the replica in-process, ``runtime: local``) on a local
worker process, and a real client. A profile hook records every Python function of ``bifrost/`` and
``kernels/`` that runs, in any thread of this process, while the client receives its 3rd and 4th token
(decode steps only: no attestation, no prefill). The worker runs in its own process and is not counted.

``--tree DIR`` runs another checkout (e.g. the previous main, ``git worktree add``) for a before/after count.

    python benchmarks/decode_path.py --json benchmarks/results/decode_path.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import link_packages, write_report  # noqa: E402

MODEL = "gpt2-mini"


def _reexec_with(tree: Path) -> None:
    """Run this script again with ``tree``'s packages imported (here and in the local worker's process)."""
    links = link_packages(tree, Path(tempfile.mkdtemp(prefix="bifrost-tree-")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(links)]), BIFROST_TRACE_TREE=str(tree))
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, help="a checkout to trace (default: the installed one)")
    ap.add_argument("--json", default="benchmarks/results/decode_path.json", help="write the report here")
    args = ap.parse_args(argv)
    tree = (args.tree or Path(__file__).resolve().parents[1]).resolve()
    if args.tree and os.environ.get("BIFROST_TRACE_TREE") != str(tree):
        _reexec_with(tree)
    roots = (str(tree / "bifrost") + os.sep, str(tree / "kernels") + os.sep)
    real: dict[str, str] = {}
    recording = threading.Event()
    seen: dict[tuple[str, str], int] = {}   # (file, qualified name) -> calls
    first_line: dict[tuple[str, str], int] = {}
    threads: set[str] = set()

    def profile(frame, event, arg):  # noqa: ANN001 - the sys.setprofile signature
        if event == "call" and recording.is_set():
            code = frame.f_code.co_filename
            path = real.get(code) or real.setdefault(code, os.path.realpath(code))
            if path.startswith(roots) and "_pb2" not in path:
                key = (os.path.relpath(path, tree), frame.f_code.co_qualname)
                seen[key] = seen.get(key, 0) + 1
                first_line.setdefault(key, frame.f_code.co_firstlineno)
                threads.add(threading.current_thread().name.rstrip("0123456789_-"))

    sys.setprofile(profile)
    threading.setprofile(profile)

    from bifrost.attest.policy import policy_from_mapping
    from bifrost.serve.client import BifrostClient
    from bifrost.serve.config import load_serve_config
    from bifrost.tee.deploy import ServeApp, run_config_yaml
    from bifrost.tee.runtime import trusted_identity
    from bifrost.worker.launcher import LocalWorker
    try:
        from bifrost.config_loader import load_config
    except ImportError:  # the previous layout
        from bifrost.config import load_config  # type: ignore[no-redef,attr-defined]

    import dataclasses

    from bifrost.attest.mtls import process_identity

    with tempfile.TemporaryDirectory() as d:
        process_identity().save(Path(d) / "identity")  # the replica presents it; the worker trusts it
        cfg = load_config().replace(model=MODEL)
        cfg = cfg.replace(tee=dataclasses.replace(cfg.tee, identity=str(Path(d) / "identity")))
        wcfg = Path(d) / "worker.yaml"
        wcfg.write_text(run_config_yaml(cfg, max_sessions=8))
        with LocalWorker(MODEL, cfg.seed, [trusted_identity(cfg).cert_pem], config=str(wcfg)) as worker:
            cert = Path(d) / "worker.pem"
            cert.write_bytes(worker.endpoint.cert_pem)
            scfg = load_serve_config().replace(runtime="local", port=0, run_dir=d, workers=(worker.endpoint.address,),
                                               worker_certs=(str(cert),), quarantine_file=str(Path(d) / "q.json"),
                                               batch_decode=False)
            app = ServeApp(cfg, scfg)
            app.start()
            try:
                policy = policy_from_mapping({"allow_simulated": True,
                                              "model_digests": [app.service.info.model_digest.hex()]})
                with BifrostClient(f"127.0.0.1:{app.port}", policy, timeout_s=300) as client:
                    client.attest()
                    for i, _ in enumerate(client.generate("Where does one token go?", 6, reset_history=True)):
                        if i == 1:
                            recording.set()  # tokens 3 and 4: decode steps only
                        elif i == 3:
                            recording.clear()
            finally:
                app.stop()
    sys.setprofile(None)
    threading.setprofile(None)
    files = sorted({f for f, _ in seen})
    report = {"tree": str(tree), "model": MODEL, "files": len(files), "functions": len(seen),
              "thread_kinds": sorted(threads), "by_file": {f: sorted(n for g, n in seen if g == f) for f in files},
              "functions_at": sorted(f"{f}:{first_line[(f, n)]} {n}" for f, n in seen)}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one decode step, Generate → worker call ({tree.name}): {len(files)} files, "
                        f"{len(seen)} functions", title_justify="left")
    table.add_column("file")
    table.add_column("functions", justify="right")
    for f in files:
        table.add_row(f, str(len(report["by_file"][f])))
    Console().print(table)
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
