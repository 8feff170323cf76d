"""Shared test data for bifrost.attest: the real vectors in data/ (see data/MANIFEST.txt) and the
verification times pinned inside every certificate's and collateral's validity window."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

DATA = Path(__file__).parent / "data"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


@dataclass(frozen=True)
class SnpVector:
    report: str
    leaf_kind: str  # "vcek" | "vlek"
    leaf: str
    chain: str
    at: datetime
    vmpl: int
    debug: bool
    product: str


SNP_VECTORS = {
    # Milan VCEK valid 2022-09-24..2029-09-24; this guest has the DEBUG policy bit set.
    "milan_vcek_v2": SnpVector("snp_milan_vcek_report_v2.bin", "vcek", "snp_milan_vcek.der", "amd_ask_ark_milan.pem", utc(2024, 1, 1), 0, True, "Milan"),
    # VLEK valid 2024-12-10..2025-12-10 (expired now): pin inside the window. VMPL 1.
    "milan_vlek_v3": SnpVector("snp_milan_vlek_report_v3.bin", "vlek", "snp_milan_vlek.der", "amd_asvk_ark_milan_vlek.pem", utc(2025, 6, 1), 1, False, "Milan"),
    # Genoa VCEK valid 2025-01-24..2032-01-24 (Azure; report_data = sha256(HCL var_data)).
    "genoa_vcek_v3": SnpVector("snp_genoa_vcek_report_v3_azure.bin", "vcek", "snp_genoa_vcek.pem", "amd_ask_ark_genoa.pem", utc(2025, 6, 1), 0, False, "Genoa"),
}


@dataclass(frozen=True)
class TdxVector:
    quote: str
    collateral: str
    at: datetime
    expected_error: str | None  # None: verifies UpToDate; else the failing check


TDX_VECTORS = {
    "dcapqvl_v4": TdxVector("tdx_quote_v4_dcapqvl.dat", "tdx_quote_v4_dcapqvl_collateral.json", utc(2025, 7, 1), None),
    "spr_e4_v4": TdxVector("tdx_quote_v4_spr_e4.dat", "tdx_quote_v4_spr_e4_collateral.json", utc(2023, 7, 1), "no_matching_tcb_level"),
    "outdated_v5": TdxVector("tdx_quote_v5_dcapqvl_outdated.dat", "tdx_quote_v5_dcapqvl_outdated_collateral.json", utc(2026, 3, 1), "no_matching_tcb_level"),
}


def read(name: str) -> bytes:
    return (DATA / name).read_bytes()
