"""VerifyOptions: one clock and one set of trust roots for every verifier (defaults: the system clock,
the bundled roots)."""

from __future__ import annotations

from datetime import datetime

import pytest

from bifrost.attest.errors import CertificateChainError
from bifrost.attest.options import DEFAULT_OPTIONS, VerifyOptions
from bifrost.attest.policy import AttestationPolicy, SnpPolicy
from bifrost.attest.roots import AMD_VCEK_CHAINS_PEM, INTEL_SGX_ROOT_CA_PEM
from bifrost.attest.snp import SnpVerifier, bundled_ark_pins
from bifrost.attest.tdx import TdxVerifier
from bifrost.attest.verdict import Evidence, get_verifier, verify_evidence

from .conftest import SNP_VECTORS, TDX_VECTORS, read, utc
from .x509_helpers import der, make_cert, pem

LENIENT = AttestationPolicy(allow_debug=True, snp=SnpPolicy(allowed_vmpls=(0, 1)))


def snp_evidence(name: str = "genoa_vcek_v3") -> Evidence:
    v = SNP_VECTORS[name]
    return Evidence("sev-snp", read(v.report), {v.leaf_kind: read(v.leaf)})


def tdx_evidence(name: str = "dcapqvl_v4") -> Evidence:
    v = TDX_VECTORS[name]
    return Evidence("tdx", read(v.quote), {"collateral": read(v.collateral)})


def test_defaults_are_the_bundled_roots_and_the_system_clock() -> None:
    assert DEFAULT_OPTIONS.intel_root_pem == INTEL_SGX_ROOT_CA_PEM
    assert dict(DEFAULT_OPTIONS.amd_vcek_chains) == AMD_VCEK_CHAINS_PEM
    assert DEFAULT_OPTIONS.amd_ark_pins is None
    assert DEFAULT_OPTIONS.time().tzinfo is not None
    assert DEFAULT_OPTIONS.time(datetime(2025, 1, 1)) == utc(2025, 1, 1)  # naive means UTC


@pytest.mark.parametrize("kind,evidence,vector", [("sev-snp", snp_evidence, SNP_VECTORS["genoa_vcek_v3"]),
                                                  ("tdx", tdx_evidence, TDX_VECTORS["dcapqvl_v4"])])
def test_injected_clock_replaces_at(kind: str, evidence, vector) -> None:
    """The options' clock is the verification time when no ``at`` is given, for both verifiers."""
    options = VerifyOptions(now=lambda: vector.at)
    verdict = verify_evidence(evidence(), LENIENT, options=options)
    assert verdict.verified_at == vector.at
    assert get_verifier(kind, options).verify(evidence(), LENIENT).verified_at == vector.at
    with pytest.raises(CertificateChainError):  # a clock outside the certificates' validity
        verify_evidence(evidence(), LENIENT, options=VerifyOptions(now=lambda: utc(2100, 1, 1)))


def test_amd_trust_roots_come_from_the_options() -> None:
    v = SNP_VECTORS["genoa_vcek_v3"]
    assert SnpVerifier(VerifyOptions()).verify(snp_evidence(), LENIENT, at=v.at).fields["product"] == "Genoa"
    with pytest.raises(CertificateChainError) as exc:  # no ARK pinned
        SnpVerifier(VerifyOptions(amd_ark_pins={})).verify(snp_evidence(), LENIENT, at=v.at)
    assert exc.value.check == "root_not_trusted"
    with pytest.raises(CertificateChainError) as exc:  # no bundled chain for Genoa
        SnpVerifier(VerifyOptions(amd_vcek_chains={}, amd_ark_pins=bundled_ark_pins())).verify(snp_evidence(), LENIENT, at=v.at)
    assert exc.value.check == "cert_missing"
    only_milan = VerifyOptions(amd_vcek_chains={"Milan": AMD_VCEK_CHAINS_PEM["Milan"]}, amd_vlek_chains={})
    ev = Evidence("sev-snp", snp_evidence().raw, {"vcek": snp_evidence().endorsements["vcek"], "cert_chain": read(v.chain)})
    with pytest.raises(CertificateChainError) as exc:  # pins default to the ARKs of the chain tables
        SnpVerifier(only_milan).verify(ev, LENIENT, at=v.at)
    assert exc.value.check == "root_not_trusted"


def test_intel_root_comes_from_the_options() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    other_root = make_cert("Intel SGX Root CA", ec.generate_private_key(ec.SECP256R1()), key_cert_sign=True)
    options = VerifyOptions(intel_root_pem=pem(der(other_root)).decode())
    with pytest.raises(CertificateChainError) as exc:
        TdxVerifier(options).verify(tdx_evidence(), LENIENT, at=TDX_VECTORS["dcapqvl_v4"].at)
    assert exc.value.check == "pck_chain" and "does not end at" in exc.value.detail
