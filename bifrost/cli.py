"""``bifrost`` command line. Each trust domain contributes its own sub-commands.

Sub-command modules expose ``add_parser(subparsers)`` and set ``func(args) -> int`` on their parser.
Only the module of the command being run is imported (``COMMANDS``): ``bifrost worker`` and
``bifrost chat`` never load the trusted runtime (``bifrost/tee``); ``bifrost --help`` loads them all.
Errors end as one line on stderr and the exit code of their class in :data:`bifrost.errors.ERROR_TABLE`,
never a traceback: a :class:`~bifrost.errors.UserError`
exits 2, an :class:`~bifrost.errors.UnavailableError` 3, a :class:`~bifrost.errors.RefusedError` or an OSError 1. Anything
else is a bug: one line "internal error" naming the exception type, exit 70 (the traceback is printed only
with ``BIFROST_DEBUG=1`` in the environment).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Callable

# The trusted runtime and a local worker share the CPU: OpenMP threads that spin while waiting
# (the default) slow the other process by 10-50x. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import ERROR_TABLE, OS_ERROR_EXIT, BifrostError, ErrorKind, error_class

DEBUG_ENV = "BIFROST_DEBUG"  # set to 1: an internal error also prints its traceback

# command -> the module that adds it. Order is the order shown in --help. A module that is absent
# (optional component) is skipped.
COMMANDS = {
    "demo": "bifrost.tee.cli",
    "generate": "bifrost.tee.cli",
    "embed": "bifrost.tee.cli",
    "serve": "bifrost.tee.serve_cli",
    "worker": "bifrost.worker.cli",
    "attest": "bifrost.attest.cli",
    "identity": "bifrost.attest.identity_cli",
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
    return run_command(lambda: args.func(args), "bifrost")


def run_command(fn: Callable[[], int | None], prog: str) -> int:
    """Run a command; its errors as one line on stderr and the exit code of their class (module docstring)."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BifrostError as exc:
        row = error_class(exc)
        if row.kind is not ErrorKind.INTERNAL:
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return row.exit_code
        return _internal(prog, exc)
    except OSError as exc:  # e.g. an output path that cannot be written: the environment's, exit 1
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return OS_ERROR_EXIT
    except Exception as exc:  # noqa: BLE001 - a bug: one line, never a traceback unless asked for
        return _internal(prog, exc)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _internal(prog: str, exc: BaseException) -> int:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(exc, file=sys.stderr)
    # an InternalError names the invariant that broke (a local user may read it); any other exception: its type only
    what = _one_line(exc) if isinstance(exc, BifrostError) else type(exc).__name__
    print(f"{prog}: internal error: {what} (a bug; set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    return ERROR_TABLE[ErrorKind.INTERNAL].exit_code


if __name__ == "__main__":
    sys.exit(main())
