"""``bifrost attest verify``: exit codes and printed verdicts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bifrost.cli import main

from .conftest import DATA, SNP_VECTORS, TDX_VECTORS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["attest", "verify", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tdx_verified(capsys) -> None:
    v = TDX_VECTORS["dcapqvl_v4"]
    code, out, _ = run(capsys, str(DATA / v.quote), "--collateral", str(DATA / v.collateral), "--at", "2025-07-01T00:00:00Z")
    assert code == 0
    assert "VERIFIED" in out and "UpToDate" in out and "measurement (MRTD)" in out and "report_data" in out
    assert "91eb2b44d141d4ece09f0c75c2c53d24" in out  # MRTD prefix


@pytest.mark.parametrize("name", ["spr_e4_v4", "outdated_v5"])
def test_tdx_negative_vectors_exit_1(capsys, name: str) -> None:
    v = TDX_VECTORS[name]
    code, out, _ = run(capsys, str(DATA / v.quote), "--collateral", str(DATA / v.collateral), "--at", v.at.isoformat())
    assert code == 1
    assert "FAILED" in out and "no_matching_tcb_level" in out and "UNVERIFIED" in out


def test_snp_with_policy(capsys, tmp_path) -> None:
    v = SNP_VECTORS["milan_vlek_v3"]
    policy = tmp_path / "p.yaml"
    policy.write_text("snp:\n  allowed_vmpls: [1]\n")
    code, out, _ = run(capsys, str(DATA / v.report), "--vcek", str(DATA / v.leaf), "--policy", str(policy), "--at", "2025-06-01")
    assert code == 0, out
    assert "VERIFIED" in out and "VLEK" in out and "bootloader=4" in out


def test_snp_debug_guest_refused_by_default(capsys) -> None:
    v = SNP_VECTORS["milan_vcek_v2"]
    code, out, _ = run(capsys, str(DATA / v.report), "--vcek", str(DATA / v.leaf), "--at", "2024-01-01")
    assert code == 1
    assert "failed check: debug" in out and "PolicyViolationError" in out


def test_snp_expired_vlek_without_pinned_time(capsys) -> None:
    v = SNP_VECTORS["milan_vlek_v3"]
    code, out, _ = run(capsys, str(DATA / v.report), "--vcek", str(DATA / v.leaf), "--at", "2030-01-01")
    assert code == 1 and "cert_validity" in out


def test_tampered_evidence_exit_1(capsys, tmp_path) -> None:
    raw = bytearray((DATA / SNP_VECTORS["genoa_vcek_v3"].report).read_bytes())
    raw[0x90] ^= 1
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(raw))
    code, out, _ = run(capsys, str(bad), "--vcek", str(DATA / "snp_genoa_vcek.pem"), "--at", "2025-06-01")
    assert code == 1 and "report_signature" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["/nonexistent/evidence.bin"], "cannot read evidence"),
        (["{data}/MANIFEST.txt"], "cannot detect the evidence type"),
        (["{data}/tdx_quote_v4_dcapqvl.dat", "--at", "yesterday"], "ISO 8601"),
        (["{data}/tdx_quote_v4_dcapqvl.dat", "--policy", "{data}/MANIFEST.txt"], "policy"),
        (["{data}/tdx_quote_v4_dcapqvl.dat", "--vcek", "{data}/snp_milan_vcek.der"], "SEV-SNP evidence only"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message: str) -> None:
    code, out, err = run(capsys, *[a.format(data=DATA) for a in argv])
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_python_m_entry_point() -> None:
    v = TDX_VECTORS["dcapqvl_v4"]
    proc = subprocess.run(
        [sys.executable, "-m", "bifrost.cli", "attest", "verify", str(DATA / v.quote), "--collateral", str(DATA / v.collateral),
         "--at", "2025-07-01T00:00:00Z", "--report-data", "00" * 64],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "report_data" in proc.stdout and "Traceback" not in proc.stderr


def test_help_documents_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["attest", "verify", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "0 verified" in out and "1 verification failed" in out and "2 bad input" in out


def test_unencodable_collateral_string_exit_1(capsys, tmp_path) -> None:
    import json

    v = TDX_VECTORS["dcapqvl_v4"]
    obj = json.loads((DATA / v.collateral).read_text())
    obj["pck_crl_issuer_chain"] = "\ud800" + obj["pck_crl_issuer_chain"]
    bad = tmp_path / "collateral.json"
    bad.write_text(json.dumps(obj))
    code, out, err = run(capsys, str(DATA / v.quote), "--collateral", str(bad), "--at", "2025-07-01T00:00:00Z")
    assert code == 1 and "collateral_format" in out and "Traceback" not in out + err


def test_unexpected_exception_is_a_one_line_failure(capsys, monkeypatch) -> None:
    """Safety net: a bug inside a verifier still ends as a refusal (exit 1), never a traceback."""
    import bifrost.attest.cli as attest_cli

    def broken(*_args, **_kwargs):
        raise RuntimeError("verifier bug\nwith two lines")

    monkeypatch.setattr(attest_cli, "verify_evidence", broken)
    v = TDX_VECTORS["dcapqvl_v4"]
    code, out, err = run(capsys, str(DATA / v.quote), "--collateral", str(DATA / v.collateral), "--at", "2025-07-01T00:00:00Z")
    assert code == 1 and err == ""
    assert out.count("\n") == 1 and "FAILED" in out and "internal error RuntimeError: verifier bug with two lines" in out
