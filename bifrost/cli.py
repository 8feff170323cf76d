"""``bifrost`` command line. Each trust domain contributes its own sub-commands.

Sub-command modules expose ``add_parser(subparsers)`` and set ``func(args) -> int`` on their parser.
Only the module of the command being run is imported (``COMMANDS``): ``bifrost worker`` and
``bifrost chat`` never load the trusted runtime (``bifrost/tee``); ``bifrost --help`` loads them all.
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

# command -> the module that adds it. Order is the order shown in --help. A module that is absent
# (optional component) is skipped.
COMMANDS = {
    "demo": "bifrost.tee.cli",
    "generate": "bifrost.tee.cli",
    "embed": "bifrost.tee.cli",
    "serve": "bifrost.tee.serve_cli",
    "worker": "bifrost.worker.cli",
    "attest": "bifrost.attest.cli",
    "policy": "bifrost.model.policy_cli",
    "chat": "bifrost.serve.cli",
    "proxy": "bifrost.serve.proxy_cli",
    "estimate": "bifrost_estimator.cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every sub-command, or only ``command``'s module when it names a known command."""
    parser = argparse.ArgumentParser(prog="bifrost", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # component not installed in this tree
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
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
