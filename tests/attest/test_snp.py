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


# ----------------------------------------------------------------------------- synthetic chains
# No real Turin report is available: these build a self-made ARK -> ASK -> VCEK chain (RSA-PSS like
# AMD's, VCEK on P-384 with the KDS extensions) and a report signed by the self-made VCEK, and run
# them through SnpVerifier with that ARK as its trust anchor. Everything after the root pin is the
# production code path (chain, signature, TCB decoding, chip ID rules).


def _der_int(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 8) // 8 or 1, "big")
    return bytes([0x02, len(body)]) + body


@pytest.fixture(scope="module")
def amd_like_keys():
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),  # ARK
        rsa.generate_private_key(public_exponent=65537, key_size=2048),  # ASK
        ec.generate_private_key(ec.SECP384R1()),  # VCEK
    )


TURIN_TCB = {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 0xA5}
CHIP_ID = bytes(range(1, 65))


def _turin_tcb_u64(tcb: dict[str, int]) -> bytes:
    return bytes([tcb["fmc"], tcb["bootloader"], tcb["tee"], tcb["snp"], 0, 0, 0, tcb["microcode"]])


def _genoa_tcb_u64(tcb: dict[str, int]) -> bytes:
    return bytes([tcb["bootloader"], tcb["tee"], 0, 0, 0, 0, tcb["snp"], tcb["microcode"]])


def synthetic_snp(keys, *, product: str = "Turin-B0", family: int = 0x1A, hwid: bytes | None = CHIP_ID[:8],
                  chip_id: bytes = CHIP_ID, leaf_tcb: dict | None = None, report_tcb: dict | None = None,
                  signer_info: int = 0):
    """(Evidence, SnpVerifier trusting the self-made ARK)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    from bifrost.attest._x509 import spki_sha256

    from .x509_helpers import der, make_cert, pem

    ark_key, ask_key, vcek_key = keys
    turin = family == 0x1A
    leaf_tcb = dict(TURIN_TCB if leaf_tcb is None else leaf_tcb)
    report_tcb = dict(leaf_tcb if report_tcb is None else report_tcb)
    oid = "1.3.6.1.4.1.3704.1."
    spl_oids = {"bootloader": "3.1", "tee": "3.2", "snp": "3.3", "microcode": "3.8", "fmc": "3.9"}
    exts = [x509.UnrecognizedExtension(x509.ObjectIdentifier(oid + "2"), bytes([0x16, len(product)]) + product.encode())]
    exts += [x509.UnrecognizedExtension(x509.ObjectIdentifier(oid + spl_oids[k]), _der_int(v)) for k, v in leaf_tcb.items()]
    if hwid is not None:
        exts.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid + "4"), hwid))
    line = product.split("-")[0]
    ark = make_cert(f"ARK-{line}", ark_key, key_cert_sign=True, pss=True)
    ask = make_cert(f"SEV-{line}", ask_key, f"ARK-{line}", ark_key, path_length=0, key_cert_sign=True, serial=2, pss=True)
    vcek = make_cert("SEV-VCEK", vcek_key, f"SEV-{line}", ask_key, ca=None, serial=3, extensions=tuple(exts), pss=True)

    raw = bytearray(SNP_REPORT_SIZE)
    tcb_u64 = (_turin_tcb_u64 if turin else _genoa_tcb_u64)(report_tcb)
    raw[0:4] = (3).to_bytes(4, "little")
    raw[0x08:0x10] = (1 << 17).to_bytes(8, "little")
    raw[0x34:0x38] = (1).to_bytes(4, "little")
    raw[0x48:0x4C] = signer_info.to_bytes(4, "little")
    raw[0x50:0x90] = b"\x42" * 64
    raw[0x90:0xC0] = b"\x17" * 48
    for off in (0x38, 0x180, 0x1E0, 0x1F0):  # current, reported, committed, launch TCB
        raw[off : off + 8] = tcb_u64
    raw[0x188:0x18B] = bytes([family, 0x02, 0x01])
    raw[0x1A0:0x1E0] = chip_id
    r, s = utils.decode_dss_signature(vcek_key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
    raw[0x2E8:0x330] = s.to_bytes(72, "little")
    evidence = Evidence("sev-snp", bytes(raw), {"vcek": der(vcek), "cert_chain": pem(der(ask)) + pem(der(ark))})
    return evidence, SnpVerifier(trusted_arks={spki_sha256(ark): "ARK-selfmade"})


SYNTH_AT = utc(2030, 1, 1)


def test_synthetic_turin_vcek_with_8_byte_hwid_verifies(amd_like_keys) -> None:
    ev, verifier = synthetic_snp(amd_like_keys)
    verdict = verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert "chip_id" in verdict.checks_passed and "reported_tcb" in verdict.checks_passed
    assert verdict.fields["product"] == "Turin"
    assert verdict.tcb["reported"] == "bootloader=2 tee=3 snp=4 microcode=165 fmc=1"
    # the bundled roots do not trust the self-made ARK
    with pytest.raises(CertificateChainError) as exc:
        verify_evidence(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert exc.value.check == "root_not_trusted"


def test_synthetic_turin_hwid_covers_the_first_8_bytes_of_chip_id(amd_like_keys) -> None:
    ev, verifier = synthetic_snp(amd_like_keys, chip_id=CHIP_ID[:8] + b"\x09" * 56)  # only [0:8] is bound
    assert "chip_id" in verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT).checks_passed
    ev, verifier = synthetic_snp(amd_like_keys, chip_id=b"\xee" + CHIP_ID[1:])
    with pytest.raises(EndorsementMismatchError) as exc:
        verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert exc.value.check == "chip_id" and "CHIP_ID[0:8]" in exc.value.detail


def test_synthetic_8_byte_hwid_on_a_non_turin_product_is_refused(amd_like_keys) -> None:
    genoa_tcb = {"bootloader": 2, "tee": 3, "snp": 4, "microcode": 0xA5}
    ev, verifier = synthetic_snp(amd_like_keys, product="Genoa-B1", family=0x19, leaf_tcb=genoa_tcb)
    with pytest.raises(EndorsementMismatchError) as exc:
        verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert exc.value.check == "chip_id" and "needs 64" in exc.value.detail
    ev, verifier = synthetic_snp(amd_like_keys, product="Genoa-B1", family=0x19, leaf_tcb=genoa_tcb, hwid=CHIP_ID)
    assert "chip_id" in verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT).checks_passed


def test_synthetic_masked_chip_id_is_a_policy_decision(amd_like_keys) -> None:
    ev, verifier = synthetic_snp(amd_like_keys, chip_id=bytes(64))
    with pytest.raises(PolicyViolationError) as exc:
        verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert exc.value.check == "chip_id" and "MASK_CHIP_ID" in exc.value.detail
    allow = dataclasses.replace(DEFAULT_POLICY, snp=SnpPolicy(allow_masked_chip_id=True))
    verdict = verifier.verify(ev, allow, at=SYNTH_AT)
    assert "chip_id" not in verdict.checks_passed
    assert any(s.startswith("chip_id (MASK_CHIP_ID") for s in verdict.checks_skipped)


def test_synthetic_mask_chip_key_with_vcek_signer_is_refused(amd_like_keys) -> None:
    ev, verifier = synthetic_snp(amd_like_keys, signer_info=0b10)  # MASK_CHIP_KEY, SIGNING_KEY=VCEK
    assert parse_snp_report(ev.raw).mask_chip_key
    with pytest.raises(EndorsementMismatchError) as exc:
        verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert exc.value.check == "signing_key" and "MASK_CHIP_KEY" in exc.value.detail


def test_synthetic_turin_fmc_spl_is_checked(amd_like_keys) -> None:
    ev, verifier = synthetic_snp(amd_like_keys, report_tcb={**TURIN_TCB, "fmc": 2})
    with pytest.raises(TcbError) as exc:
        verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert exc.value.check == "reported_tcb" and "fmc" in exc.value.detail
    no_fmc = {k: v for k, v in TURIN_TCB.items() if k != "fmc"}
    ev, verifier = synthetic_snp(amd_like_keys, leaf_tcb=no_fmc, report_tcb=TURIN_TCB)
    with pytest.raises(TcbError) as exc:
        verifier.verify(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert "lacks TCB extension(s) fmc" in exc.value.detail


def test_synthetic_leaf_signed_by_a_non_ca_is_refused(amd_like_keys) -> None:
    """A chain whose ASK lacks CA rights is refused even though every signature verifies."""
    from bifrost.attest._x509 import spki_sha256

    from .x509_helpers import der, make_cert, pem

    ev, _ = synthetic_snp(amd_like_keys)
    ark_key, ask_key, vcek_key = amd_like_keys
    ark = make_cert("ARK-Turin", ark_key, key_cert_sign=True, pss=True)
    ask = make_cert("SEV-Turin", ask_key, "ARK-Turin", ark_key, ca=False, serial=2, pss=True)
    leaf = x509.load_der_x509_certificate(ev.endorsements["vcek"])
    assert leaf.issuer == ask.subject
    ev = dataclasses.replace(ev, endorsements={"vcek": ev.endorsements["vcek"], "cert_chain": pem(der(ask)) + pem(der(ark))})
    with pytest.raises(CertificateChainError) as exc:
        SnpVerifier(trusted_arks={spki_sha256(ark): "x"}).verify(ev, DEFAULT_POLICY, at=SYNTH_AT)
    assert exc.value.check == "cert_chain" and "not a CA" in exc.value.detail
