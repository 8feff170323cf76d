"""``bifrost`` command line. Each trust domain contributes its own sub-commands.

Sub-command modules expose ``add_parser(subparsers)`` and set ``func(args) -> int`` on their parser.
Any :class:`~bifrost.errors.BifrostError` (and a few well-understood OS errors) becomes one line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# The trusted runtime and a local worker share the CPU: OpenMP threads that spin while waiting
# (the default) slow the other process by 10-50x. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import BifrostError

# Order is the order shown in --help. A module that is absent (optional component) is skipped.
SUBCOMMAND_MODULES = (
    "bifrost.tee.cli",
    "bifrost.worker.cli",
    "bifrost.attest.cli",
    "bifrost.serve.cli",
    "bifrost_estimator.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bifrost", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # component not installed in this tree
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BifrostError as exc:
        print(f"bifrost: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # e.g. an output path that cannot be written
        print(f"bifrost: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bifrost: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
