"""``bifrost attest verify EVIDENCE``: offline verification with a human-readable verdict.
``bifrost attest init-policy --address HOST:PORT``: write a commented client policy pinning a server's digests.

Exit codes (verify): 0 verified, 1 verification failed (verdict printed), 2 usage/input error (one line).
"""

from __future__ import annotations

import argparse
import struct
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import UserError
from .errors import AttestationError, PolicyConfigError
from .evidence import SIMULATED_MAGIC
from .policy import DEFAULT_POLICY, load_policy
from .snp import SNP_REPORT_SIZE, parse_snp_report
from .tdx import TEE_TYPE_TDX, parse_tdx_quote
from .verdict import EVIDENCE_TYPES, Evidence, Verdict, verify_evidence


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    attest = subparsers.add_parser("attest", help="remote attestation: verify TDX / SEV-SNP evidence")
    attest_sub = attest.add_subparsers(dest="attest_command", metavar="ACTION")
    verify = attest_sub.add_parser(
        "verify",
        help="verify evidence offline and print the verdict",
        description="Verify SEV-SNP / TDX (or simulated) evidence offline and print the verdict. Nothing is "
        "fetched over the network: endorsements and collateral come from the files given.",
        epilog="exit codes: 0 verified; 1 verification failed (the failed check is printed); "
        "2 bad input (unreadable file, undetectable evidence type, bad --at/--policy/--report-data).",
    )
    verify.add_argument("evidence", metavar="EVIDENCE", help="raw SEV-SNP report, TDX quote, or simulated evidence")
    verify.add_argument("--type", choices=("auto",) + EVIDENCE_TYPES, default="auto", help="evidence type (default: detect)")
    verify.add_argument("--vcek", metavar="FILE", help="SEV-SNP VCEK or VLEK certificate (DER or PEM)")
    verify.add_argument("--cert-chain", metavar="FILE", help="SEV-SNP ASK/ASVK+ARK PEM (default: bundled AMD chain)")
    verify.add_argument("--collateral", metavar="FILE", help="TDX collateral JSON (dcap-qvl QuoteCollateralV3 layout)")
    verify.add_argument("--policy", metavar="FILE", help="policy YAML (default: built-in strict policy)")
    verify.add_argument("--at", metavar="TIME", help="verification time, ISO 8601 UTC (default: now)")
    verify.add_argument("--report-data", metavar="HEX", help="expected 64-byte report_data (hex)")
    verify.set_defaults(func=run_verify)
    init = attest_sub.add_parser(
        "init-policy",
        help="write a commented client policy pinning a server's model and serving-config digests",
        description="Ask a server for its models (ListModels, unauthenticated) and write a client attestation "
        "policy YAML that pins their model and serving-config digests, with comments on every key. Compare the "
        "digests with the operator's `bifrost serve --print-digests` before trusting the file.",
    )
    init.add_argument("--address", required=True, metavar="HOST:PORT", help="address of `bifrost serve`")
    init.add_argument("--tls-ca", metavar="CA", help="connect with TLS, verifying the server against this PEM CA file")
    init.add_argument("--out", default="policy.yaml", metavar="FILE", help="where to write (default: policy.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")
    init.set_defaults(func=run_init_policy)
    attest.set_defaults(func=lambda args: (attest.print_help(), 2)[1])


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def detect_evidence_type(raw: bytes) -> str:
    if raw.startswith(SIMULATED_MAGIC):
        return "simulated"
    if len(raw) == SNP_REPORT_SIZE and 2 <= struct.unpack_from("<I", raw, 0)[0] <= 5:
        return "sev-snp"
    if len(raw) >= 8 and struct.unpack_from("<H", raw, 0)[0] in (4, 5) and struct.unpack_from("<I", raw, 4)[0] == TEE_TYPE_TDX:
        return "tdx"
    raise UserError("cannot detect the evidence type; pass --type sev-snp|tdx|simulated")


def _parse_time(text: str | None) -> datetime:
    if text is None:
        return datetime.now(timezone.utc)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--at {text!r} is not an ISO 8601 time (e.g. 2025-07-01T00:00:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def build_evidence(args: argparse.Namespace) -> Evidence:
    raw = _read(args.evidence, "evidence") or b""
    kind = detect_evidence_type(raw) if args.type == "auto" else args.type
    endorsements: dict[str, bytes] = {}
    leaf = _read(args.vcek, "VCEK/VLEK certificate")
    if leaf is not None:
        if kind != "sev-snp":
            raise UserError("--vcek applies to SEV-SNP evidence only")
        signer = raw[0x48] >> 2 & 0x7 if len(raw) > 0x48 else 0
        endorsements["vlek" if signer == 1 else "vcek"] = leaf
    chain = _read(args.cert_chain, "certificate chain")
    if chain is not None:
        endorsements["cert_chain"] = chain
    collateral = _read(args.collateral, "collateral")
    if collateral is not None:
        if kind != "tdx":
            raise UserError("--collateral applies to TDX evidence only")
        endorsements["collateral"] = collateral
    return Evidence(kind, raw, endorsements)


def _unverified_fields(evidence: Evidence) -> dict[str, str]:
    """Fields parsed from evidence that failed verification (shown as UNVERIFIED)."""
    try:
        if evidence.evidence_type == "sev-snp":
            r = parse_snp_report(evidence.raw)
            return {"measurement": r.measurement.hex(), "reported_tcb": str(r.reported_tcb), "debug": str(r.debug),
                    "vmpl": str(r.vmpl), "report_data": r.report_data.hex()}
        if evidence.evidence_type == "tdx":
            q = parse_tdx_quote(evidence.raw)
            return {"mrtd": q.body.mr_td.hex(), "tee_tcb_svn": q.body.tee_tcb_svn.hex(), "debug": str(q.body.debug),
                    "report_data": q.body.report_data.hex()}
    except AttestationError:
        pass
    return {}


def run_verify(args: argparse.Namespace) -> int:
    console = Console(highlight=False, soft_wrap=True)
    try:
        policy = load_policy(args.policy) if args.policy else DEFAULT_POLICY
    except PolicyConfigError as exc:
        raise UserError(f"policy: {exc}") from None
    evidence = build_evidence(args)
    at = _parse_time(args.at)
    expected = None
    if args.report_data:
        try:
            expected = bytes.fromhex(args.report_data)
        except ValueError:
            raise UserError("--report-data must be hex") from None
    try:
        verdict = verify_evidence(evidence, policy, at=at, expected_report_data=expected)
    except AttestationError as exc:
        console.print(f"[bold red]FAILED[/]: {evidence.evidence_type} evidence refused")
        console.print(f"failed check: {exc.check} ({type(exc).__name__})")
        console.print(f"reason: {exc.detail}")
        fields = _unverified_fields(evidence)
        if fields:
            _print_table(console, "Parsed fields (UNVERIFIED)", fields)
        return 1
    except Exception as exc:  # noqa: BLE001 - safety net: a verifier bug must still end as a refusal
        detail = " ".join(str(exc).split())[:200]
        console.print(f"[bold red]FAILED[/]: {evidence.evidence_type} evidence refused (internal error {type(exc).__name__}: {detail})")
        return 1
    _print_verdict(console, verdict)
    return 0


def run_init_policy(args: argparse.Namespace) -> int:
    from .init_policy import fetch_served_models, remote_source, render_policy, write_policy

    if Path(args.out).exists() and not args.force:
        raise UserError(f"{args.out} exists; pass --force to overwrite it")
    models, evidence_type = fetch_served_models(args.address, args.tls_ca, args.timeout)
    write_policy(args.out, render_policy(models, evidence_type, remote_source(args.address)), force=args.force)
    names = ", ".join(m.name for m in models)
    print(f"wrote {args.out}: pins {names} (evidence {evidence_type or 'unknown'}); the digests came from the server "
          "unauthenticated: compare them with the operator's `bifrost serve --print-digests`")
    if evidence_type == "simulated":
        print("WARNING: the server's evidence is SIMULATED; the policy sets allow_simulated: true (development only)")
    return 0


def _print_table(console: Console, title: str, rows: dict[str, str]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def _print_verdict(console: Console, v: Verdict) -> None:
    colour = "yellow" if v.simulated else "green"
    console.print(f"[bold {colour}]VERIFIED[/]: {v.summary}")
    rows = {
        "evidence type": v.evidence_type,
        "measurement" if v.evidence_type != "tdx" else "measurement (MRTD)": v.measurement.hex(),
        "TCB status": v.tcb_status,
        **{f"TCB {k}": val for k, val in v.tcb.items()},
        "debug": str(v.debug),
        "report_data": v.report_data.hex(),
        **dict(v.fields),
        "verified at": v.verified_at.isoformat(),
        "checks passed": ", ".join(v.checks_passed),
        "not checked": ", ".join(v.checks_skipped) or "-",
    }
    if v.advisory_ids:
        rows["advisories"] = ", ".join(v.advisory_ids)
    _print_table(console, "Attestation verdict", rows)
