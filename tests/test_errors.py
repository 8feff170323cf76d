"""The error taxonomy (bifrost.errors): each class maps to one gRPC status and one CLI exit code, and the CLIs
exit with the table's code, one line on stderr, never a traceback (a bug: "internal error", exit 70)."""

from __future__ import annotations

import grpc
import pytest

from bifrost import errors
from bifrost.attest import errors as attest_errors
from bifrost.cli import DEBUG_ENV, main, run_command
from bifrost.errors import (ERROR_TABLE, OS_ERROR_EXIT, BifrostError, ErrorKind, InternalError, RefusedError,
                            UnavailableError, UserError, error_class)

EXPECTED = [  # class, kind, gRPC status, exit code
    (UserError, ErrorKind.USER, grpc.StatusCode.INVALID_ARGUMENT, 2),
    (UnavailableError, ErrorKind.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, 3),
    (RefusedError, ErrorKind.REFUSED, grpc.StatusCode.PERMISSION_DENIED, 1),
    (InternalError, ErrorKind.INTERNAL, grpc.StatusCode.INTERNAL, 70),
]


@pytest.mark.parametrize("cls, kind, status, code", EXPECTED)
def test_each_class_maps_to_its_grpc_status_and_exit_code(cls, kind, status, code):
    row = error_class(cls("x"))
    assert row is ERROR_TABLE[kind] and row.kind is kind
    assert getattr(grpc.StatusCode, row.grpc_status) is status
    assert row.exit_code == code == cls.exit_code
    assert issubclass(cls, BifrostError)


def test_the_table_is_complete_and_only_internal_errors_hide_their_message():
    assert set(ERROR_TABLE) == set(ErrorKind)
    assert [k for k, row in ERROR_TABLE.items() if not row.public_message] == [ErrorKind.INTERNAL]
    assert [k for k, row in ERROR_TABLE.items() if row.retryable] == [ErrorKind.UNAVAILABLE]


def test_a_bare_bifrost_error_is_a_user_error_and_anything_else_internal():
    assert error_class(BifrostError("x")).kind is ErrorKind.USER
    assert error_class(RuntimeError("x")).kind is ErrorKind.INTERNAL
    assert error_class(KeyError("x")).kind is ErrorKind.INTERNAL


def test_attestation_errors_are_refusals_except_a_malformed_policy_file():
    for name in dir(attest_errors):
        cls = getattr(attest_errors, name)
        if isinstance(cls, type) and issubclass(cls, attest_errors.AttestationError):
            exc = cls("some_check", "detail")
            assert exc.check == "some_check" and isinstance(exc, BifrostError)
            if cls is attest_errors.PolicyConfigError:
                assert error_class(exc).kind is ErrorKind.USER and exc.exit_code == 2
            else:
                assert isinstance(exc, RefusedError)
                assert error_class(exc).kind is ErrorKind.REFUSED and exc.exit_code == 1


def test_a_worker_call_failure_is_an_availability_error():
    from bifrost.tee.link import WorkerCallError

    exc = WorkerCallError(grpc.StatusCode.UNAVAILABLE, "down")
    assert isinstance(exc, UnavailableError) and error_class(exc).kind is ErrorKind.UNAVAILABLE


@pytest.mark.parametrize("cls, kind, status, code", EXPECTED[:3])
def test_the_cli_exits_with_the_table_code_and_one_line(capsys, cls, kind, status, code):
    def command():
        raise cls("the reason\nover two lines")

    assert run_command(command, "bifrost") == code
    err = capsys.readouterr().err
    assert err == "bifrost: error: the reason over two lines\n"


@pytest.mark.parametrize("exc", [RuntimeError("secret-ish state"), InternalError("invariant broke")])
def test_a_bug_is_one_line_internal_error_exit_70(capsys, monkeypatch, exc):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def command():
        raise exc

    assert run_command(command, "bifrost") == 70
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("bifrost: internal error") and "Traceback" not in err
    if isinstance(exc, RuntimeError):
        assert "RuntimeError" in err and "secret-ish" not in err
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert run_command(command, "bifrost") == 70
    assert "Traceback" in capsys.readouterr().err


def test_an_os_error_is_one_line_and_exit_1(capsys):
    def command():
        raise PermissionError(13, "Permission denied", "/out.json")

    assert run_command(command, "bifrost") == OS_ERROR_EXIT == 1
    assert capsys.readouterr().err.startswith("bifrost: error: [Errno 13] Permission denied")


def test_bifrost_generate_with_zero_new_tokens_is_a_user_error(capsys):
    assert main(["generate", "--model", "gpt2-mini", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bifrost: error")]
    assert len(lines) == 1 and "at least 1" in lines[0] and "Traceback" not in err


def test_the_worker_cli_exits_with_the_table_code(capsys, tmp_path):
    from bifrost.worker.cli import main as worker_main

    assert worker_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bifrost-worker: error:") and "config file not found" in err and len(err.splitlines()) == 1


def test_errors_module_exports():
    assert {"UserError", "UnavailableError", "RefusedError", "InternalError"} <= set(vars(errors))
