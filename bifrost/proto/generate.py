"""Regenerate the committed gRPC stubs: ``python -m bifrost.proto.generate`` (needs grpcio-tools).

Besides the modules, protoc writes ``*_pb2.pyi`` type stubs: the ``*_pb2.py`` modules build their message
classes at import time, so the type checker (``make test``) reads the classes from the stubs.

The stubs are committed so that installing Bifrost needs no code generation; ``tests/proto`` checks
they match the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = sorted(p.name for p in HERE.glob("*.proto"))


REPO_ROOT = HERE.parent.parent  # so generated imports read "bifrost.proto.x_pb2"


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Write ``bifrost/proto/*_pb2*.py`` and ``*_pb2.pyi`` under ``out_root``; returns the files written."""
    from grpc_tools import protoc

    written = []
    for name in PROTOS:
        rel = f"bifrost/proto/{name}"
        args = ["protoc", f"-I{REPO_ROOT}", f"--python_out={out_root}", f"--grpc_python_out={out_root}",
                f"--pyi_out={out_root}", rel]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {rel}")
        stem = out_root / "bifrost" / "proto" / name.removesuffix(".proto")
        written += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2_grpc.py"), Path(f"{stem}_pb2.pyi")]
    return written


if __name__ == "__main__":
    for p in generate():
        print(p)
    sys.exit(0)
