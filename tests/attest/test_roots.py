"""The bundled trust anchors (bifrost.attest.roots) equal the real vectors in data/, and the AMD
chains verify (ASK/ASVK under its ARK with RSA-PSS, ARK self-signed, CA constraints)."""

from __future__ import annotations

import pytest
from cryptography import x509

from bifrost.attest._x509 import check_issued_by, load_certificate, load_pem_chain, spki_sha256, verify_chain
from bifrost.attest.errors import CertificateChainError
from bifrost.attest.roots import AMD_VCEK_CHAINS_PEM, AMD_VLEK_CHAINS_PEM, INTEL_SGX_ROOT_CA_PEM
from bifrost.attest.snp import bundled_ark_pins

from .conftest import read, utc

CHAIN_FILES = {
    ("vcek", "Milan"): "amd_ask_ark_milan.pem",
    ("vcek", "Genoa"): "amd_ask_ark_genoa.pem",
    ("vcek", "Turin"): "amd_ask_ark_turin.pem",
    ("vlek", "Milan"): "amd_asvk_ark_milan_vlek.pem",
}


@pytest.mark.parametrize("kind,product", sorted(CHAIN_FILES))
def test_bundled_amd_chain_equals_vector_file(kind: str, product: str) -> None:
    bundled = (AMD_VCEK_CHAINS_PEM if kind == "vcek" else AMD_VLEK_CHAINS_PEM)[product]
    from_file = load_pem_chain(read(CHAIN_FILES[kind, product]), "vector chain")
    assert load_pem_chain(bundled.encode(), "bundled chain") == from_file  # certificate equality is DER equality
    assert bundled_ark_pins()[spki_sha256(from_file[1])] == f"ARK-{product}"


def test_turin_ask_verifies_under_turin_ark_with_rsa_pss() -> None:
    ask, ark = load_pem_chain(read("amd_ask_ark_turin.pem"), "Turin chain")
    assert ask.subject.rfc4514_string().startswith("CN=SEV-Turin") and ark.subject.rfc4514_string().startswith("CN=ARK-Turin")
    assert ask.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
    assert ark.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
    # the same rules the SNP verifier applies: signatures, CA constraints, validity
    verify_chain([ask, ark], ["ASK", "ARK"], utc(2030, 1, 1))
    milan_ark = load_pem_chain(read("amd_ask_ark_milan.pem"), "Milan chain")[1]
    with pytest.raises(CertificateChainError):
        check_issued_by(ask, milan_ark, "Turin ASK")
    with pytest.raises(CertificateChainError):  # Turin ARK valid from 2023-05-15
        verify_chain([ask, ark], ["ASK", "ARK"], utc(2023, 1, 1))


def test_intel_root_file_equals_bundled_root() -> None:
    from_file = load_certificate(read("intel_sgx_root_ca.pem"), "Intel root")
    bundled = load_certificate(INTEL_SGX_ROOT_CA_PEM.encode(), "bundled Intel root")
    assert from_file == bundled
    assert "CN=Intel SGX Root CA" in from_file.subject.rfc4514_string()
    check_issued_by(from_file, from_file, "Intel SGX Root CA (self-signed)")
