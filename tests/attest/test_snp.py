"""SEV-SNP verification on the real vectors, plus tamper cases that must fail with the right error."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bifrost.attest.errors import (
    AttestationError,
    BindingError,
    CertificateChainError,
    EndorsementMismatchError,
    EvidenceFormatError,
    PolicyViolationError,
    SignatureError,
    TcbError,
)
from bifrost.attest.policy import DEFAULT_POLICY, AttestationPolicy, SnpPolicy
from bifrost.attest.snp import (
    SNP_REPORT_SIZE,
    SnpVerifier,
    check_tcb_matches_leaf,
    parse_cert_table,
    parse_snp_report,
)
from bifrost.attest.verdict import Evidence, verify_evidence

from .conftest import SNP_VECTORS, read, utc

LENIENT = AttestationPolicy(allow_debug=True, snp=SnpPolicy(allowed_vmpls=(0, 1)))
VECTOR_IDS = sorted(SNP_VECTORS)


def evidence(name: str, raw: bytes | None = None, *, chain: bool = True, leaf: bytes | None = None) -> Evidence:
    v = SNP_VECTORS[name]
    endorsements = {v.leaf_kind: leaf if leaf is not None else read(v.leaf)}
    if chain:
        endorsements["cert_chain"] = read(v.chain)
    return Evidence("sev-snp", raw if raw is not None else read(v.report), endorsements)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


@pytest.mark.parametrize("name", VECTOR_IDS)
@pytest.mark.parametrize("with_chain_file", [True, False], ids=["chain-file", "bundled-chain"])
def test_vector_verifies(name: str, with_chain_file: bool) -> None:
    v = SNP_VECTORS[name]
    verdict = verify_evidence(evidence(name, chain=with_chain_file), LENIENT, at=v.at)
    assert verdict.evidence_type == "sev-snp"
    for check in ("cert_chain", "report_signature", "reported_tcb", "debug", "vmpl"):
        assert check in verdict.checks_passed
    assert verdict.fields["signer"] == v.leaf_kind.upper()
    assert verdict.fields["product"] == v.product
    assert verdict.fields["vmpl"] == str(v.vmpl)
    assert verdict.debug is v.debug
    assert not verdict.simulated
    assert ("chip_id" in verdict.checks_passed) is (v.leaf_kind == "vcek")
    assert verdict.measurement == parse_snp_report(read(v.report)).measurement


def test_milan_report_fields_match_manifest() -> None:
    r = parse_snp_report(read("snp_milan_vcek_report_v2.bin"))
    assert r.version == 2 and r.vmpl == 0 and r.signing_key == 0
    assert r.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
    tcb = r.reported_tcb
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (2, 0, 5, 0x44)
    assert r.cpuid_fam_id is None  # v2 reports predate the CPUID fields
    assert len(r.measurement) == 48 and len(r.host_data) == 32 and len(r.chip_id) == 64


def test_v3_reports_carry_cpuid() -> None:
    genoa = parse_snp_report(read("snp_genoa_vcek_report_v3_azure.bin"))
    assert (genoa.cpuid_fam_id, genoa.cpuid_mod_id, genoa.cpuid_step) == (0x19, 0x11, 1)
    vlek = parse_snp_report(read("snp_milan_vlek_report_v3.bin"))
    assert (vlek.cpuid_fam_id, vlek.cpuid_mod_id, vlek.signing_key) == (0x19, 0x01, 1)


def test_default_policy_refuses_debug_guest() -> None:
    v = SNP_VECTORS["milan_vcek_v2"]
    with pytest.raises(PolicyViolationError) as exc:
        verify_evidence(evidence("milan_vcek_v2"), DEFAULT_POLICY, at=v.at)
    assert exc.value.check == "debug"


def test_default_policy_refuses_vmpl1() -> None:
    v = SNP_VECTORS["milan_vlek_v3"]
    with pytest.raises(PolicyViolationError) as exc:
        verify_evidence(evidence("milan_vlek_v3"), DEFAULT_POLICY, at=v.at)
    assert exc.value.check == "vmpl"


def test_default_policy_accepts_genoa() -> None:
    v = SNP_VECTORS["genoa_vcek_v3"]
    verdict = verify_evidence(evidence("genoa_vcek_v3"), DEFAULT_POLICY, at=v.at)
    assert "measurement (not pinned)" in verdict.checks_skipped


# ----------------------------------------------------------------------------- tamper cases

SIGNED_FIELD_OFFSETS = {
    "report_data": 0x50,
    "measurement": 0x90,
    "host_data": 0xC0,
    "reported_tcb": 0x180,
    "guest_policy": 0x08,
    "chip_id": 0x1A0,
}


@pytest.mark.parametrize("name", VECTOR_IDS)
@pytest.mark.parametrize("field", sorted(SIGNED_FIELD_OFFSETS))
def test_flipping_signed_field_breaks_signature(name: str, field: str) -> None:
    v = SNP_VECTORS[name]
    raw = flip(read(v.report), SIGNED_FIELD_OFFSETS[field])
    with pytest.raises(SignatureError) as exc:
        verify_evidence(evidence(name, raw), LENIENT, at=v.at)
    assert exc.value.check == "report_signature"


@pytest.mark.parametrize("name", VECTOR_IDS)
@pytest.mark.parametrize("offset", [0x2A0, 0x2C0, 0x2E8, 0x320])
def test_flipping_signature_fails(name: str, offset: int) -> None:
    v = SNP_VECTORS[name]
    with pytest.raises(SignatureError) as exc:
        verify_evidence(evidence(name, flip(read(v.report), offset)), LENIENT, at=v.at)
    assert exc.value.check == "report_signature"


@pytest.mark.parametrize("name", VECTOR_IDS)
@pytest.mark.parametrize("length", [0, 1, 0x50, 0x2A0, SNP_REPORT_SIZE - 1])
def test_truncated_report_is_format_error(name: str, length: int) -> None:
    v = SNP_VECTORS[name]
    with pytest.raises(EvidenceFormatError) as exc:
        verify_evidence(evidence(name, read(v.report)[:length]), LENIENT, at=v.at)
    assert exc.value.check == "report_format"


def test_bad_version_and_algorithm_are_format_errors() -> None:
    raw = read("snp_genoa_vcek_report_v3_azure.bin")
    with pytest.raises(EvidenceFormatError):
        parse_snp_report(b"\x09" + raw[1:])
    with pytest.raises(EvidenceFormatError):
        parse_snp_report(raw[:0x34] + b"\x02" + raw[0x35:])


def _leaf_der(name: str) -> bytes:
    v = SNP_VECTORS[name]
    data = read(v.leaf)
    if data.startswith(b"-----"):
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")  # AMD VCEK serial 0
            return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return data


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_tampered_leaf_certificate_signature(name: str) -> None:
    v = SNP_VECTORS[name]
    leaf = flip(_leaf_der(name), len(_leaf_der(name)) - 20)
    with pytest.raises(CertificateChainError) as exc:
        verify_evidence(evidence(name, leaf=leaf), LENIENT, at=v.at)
    assert exc.value.check == "cert_chain"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_garbage_leaf_certificate(name: str) -> None:
    v = SNP_VECTORS[name]
    with pytest.raises(CertificateChainError) as exc:
        verify_evidence(evidence(name, leaf=_leaf_der(name)[:100]), LENIENT, at=v.at)
    assert exc.value.check == "cert_parse"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_tampered_ask_in_chain(name: str) -> None:
    v = SNP_VECTORS[name]
    ask, ark = x509.load_pem_x509_certificates(read(v.chain))
    ask_der = flip(ask.public_bytes(serialization.Encoding.DER), len(ask.public_bytes(serialization.Encoding.DER)) - 30)
    ask_pem = b"-----BEGIN CERTIFICATE-----\n" + __import__("base64").encodebytes(ask_der) + b"-----END CERTIFICATE-----\n"
    ev = evidence(name)
    ev = dataclasses.replace(ev, endorsements={**ev.endorsements, "cert_chain": ask_pem + ark.public_bytes(serialization.Encoding.PEM)})
    with pytest.raises(CertificateChainError) as exc:
        verify_evidence(ev, LENIENT, at=v.at)
    assert exc.value.check in ("cert_chain", "cert_parse")


def test_wrong_product_chain() -> None:
    v = SNP_VECTORS["milan_vcek_v2"]
    ev = evidence("milan_vcek_v2")
    ev = dataclasses.replace(ev, endorsements={**ev.endorsements, "cert_chain": read("amd_ask_ark_genoa.pem")})
    with pytest.raises(CertificateChainError) as exc:
        verify_evidence(ev, LENIENT, at=v.at)
    assert exc.value.check == "cert_chain"


def test_untrusted_root_is_refused() -> None:
    """A chain ending at a self-made ARK (not a bundled AMD root) is refused before anything else."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ARK-Milan")])
    fake = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(utc(2020, 1, 1)).not_valid_after(utc(2040, 1, 1)).sign(key, hashes.SHA256())
    )
    ask = x509.load_pem_x509_certificates(read("amd_ask_ark_milan.pem"))[0]
    ev = evidence("milan_vcek_v2")
    chain = ask.public_bytes(serialization.Encoding.PEM) + fake.public_bytes(serialization.Encoding.PEM)
    ev = dataclasses.replace(ev, endorsements={**ev.endorsements, "cert_chain": chain})
    with pytest.raises(CertificateChainError) as exc:
        verify_evidence(ev, LENIENT, at=SNP_VECTORS["milan_vcek_v2"].at)
    assert exc.value.check == "root_not_trusted"


def test_vcek_from_another_chip_fails() -> None:
    """Genoa's VCEK (with Genoa's chain) cannot verify the Milan report."""
    v = SNP_VECTORS["milan_vcek_v2"]
    ev = Evidence("sev-snp", read(v.report), {"vcek": read("snp_genoa_vcek.pem"), "cert_chain": read("amd_ask_ark_genoa.pem")})
    with pytest.raises(SignatureError) as exc:
        verify_evidence(ev, LENIENT, at=utc(2025, 6, 1))
    assert exc.value.check == "report_signature"


def test_vlek_supplied_for_vcek_signed_report() -> None:
    v = SNP_VECTORS["genoa_vcek_v3"]
    ev = Evidence("sev-snp", read(v.report), {"vlek": read("snp_milan_vlek.der")})
    with pytest.raises(EndorsementMismatchError) as exc:
        verify_evidence(ev, LENIENT, at=v.at)
    assert exc.value.check == "signing_key"


def test_vcek_cert_in_vlek_slot_is_refused() -> None:
    v = SNP_VECTORS["milan_vlek_v3"]
    ev = Evidence("sev-snp", read(v.report), {"vlek": read("snp_milan_vcek.der")})
    with pytest.raises(EndorsementMismatchError) as exc:
        verify_evidence(ev, LENIENT, at=v.at)
    assert exc.value.check == "signing_key"


@pytest.mark.parametrize("when", [utc(2022, 1, 1), utc(2026, 1, 1)], ids=["before", "after"])
def test_vlek_outside_validity_window(when) -> None:
    with pytest.raises(CertificateChainError) as exc:
        verify_evidence(evidence("milan_vlek_v3"), LENIENT, at=when)
    assert exc.value.check == "cert_validity"


def test_tcb_fields_must_match_vcek() -> None:
    report = parse_snp_report(read("snp_milan_vcek_report_v2.bin"))
    good = {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}
    check_tcb_matches_leaf(report.reported_tcb, good)
    for field in good:
        with pytest.raises(TcbError) as exc:
            check_tcb_matches_leaf(report.reported_tcb, {**good, field: good[field] + 1})
        assert exc.value.check == "reported_tcb" and field in exc.value.detail
    with pytest.raises(TcbError):
        check_tcb_matches_leaf(report.reported_tcb, {"bootloader": 2})


def test_min_tcb_policy() -> None:
    v = SNP_VECTORS["genoa_vcek_v3"]
    ok = dataclasses.replace(DEFAULT_POLICY, snp=SnpPolicy(min_tcb={"bootloader": 10, "snp": 23, "microcode": 84}))
    assert "min_tcb" in verify_evidence(evidence("genoa_vcek_v3"), ok, at=v.at).checks_passed
    high = dataclasses.replace(DEFAULT_POLICY, snp=SnpPolicy(min_tcb={"snp": 24}))
    with pytest.raises(TcbError) as exc:
        verify_evidence(evidence("genoa_vcek_v3"), high, at=v.at)
    assert exc.value.check == "min_tcb"


def test_measurement_and_host_data_allow_lists() -> None:
    v = SNP_VECTORS["genoa_vcek_v3"]
    report = parse_snp_report(read(v.report))
    pinned = dataclasses.replace(DEFAULT_POLICY, snp=SnpPolicy(measurements=(report.measurement,), host_data=(report.host_data,)))
    verdict = verify_evidence(evidence("genoa_vcek_v3"), pinned, at=v.at)
    assert {"measurement", "host_data"} <= set(verdict.checks_passed)
    for field, policy in (
        ("measurement", SnpPolicy(measurements=(bytes(48),))),
        ("host_data", SnpPolicy(host_data=(b"\x01" * 32,))),
    ):
        with pytest.raises(PolicyViolationError) as exc:
            verify_evidence(evidence("genoa_vcek_v3"), dataclasses.replace(DEFAULT_POLICY, snp=policy), at=v.at)
        assert exc.value.check == field


def test_expected_report_data() -> None:
    v = SNP_VECTORS["milan_vcek_v2"]
    expected = bytes([1, 2, 3, 4, 5]) + bytes(59)
    verdict = verify_evidence(evidence("milan_vcek_v2"), LENIENT, at=v.at, expected_report_data=expected)
    assert "report_data" in verdict.checks_passed
    with pytest.raises(BindingError) as exc:
        verify_evidence(evidence("milan_vcek_v2"), LENIENT, at=v.at, expected_report_data=bytes(64))
    assert exc.value.check == "report_data"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_bit_flips_anywhere_raise_typed_errors(name: str) -> None:
    """Flip one bit at strided offsets over the whole report: always a typed AttestationError."""
    v = SNP_VECTORS[name]
    raw = read(v.report)
    for offset in range(0, SNP_REPORT_SIZE, 29):
        tampered = flip(raw, offset, 0x80)
        if offset >= 0x330:  # reserved bytes after the signature are not signed
            continue
        with pytest.raises(AttestationError):
            SnpVerifier().verify(evidence(name, tampered), LENIENT, at=v.at)


def test_cert_table_round_trip() -> None:
    vcek = read("snp_milan_vcek.der")
    ask_ark = x509.load_pem_x509_certificates(read("amd_ask_ark_milan.pem"))
    ask = ask_ark[0].public_bytes(serialization.Encoding.DER)
    entries = [("63da758d-e664-4564-adc5-f4b93be8accd", vcek), ("4ab7b379-bbac-4fe4-a02f-05aef327c782", ask)]
    header_size = 24 * (len(entries) + 1)
    table, blobs, offset = b"", b"", header_size
    for guid, blob in entries:
        table += uuid.UUID(guid).bytes_le + offset.to_bytes(4, "little") + len(blob).to_bytes(4, "little")
        blobs += blob
        offset += len(blob)
    aux = table + bytes(24) + blobs
    parsed = parse_cert_table(aux)
    assert parsed == {"vcek": vcek, "ask": ask}
    with pytest.raises(EvidenceFormatError):
        parse_cert_table(aux[:30])
