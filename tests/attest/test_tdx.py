"""TDX quote verification on the real vectors, tamper cases, and the dcap-qvl cross-check."""

from __future__ import annotations

import calendar
import dataclasses
import json

import pytest

from bifrost.attest.errors import (
    AttestationError,
    BindingError,
    CertificateChainError,
    CollateralError,
    EvidenceFormatError,
    PolicyViolationError,
    SignatureError,
    TcbError,
    UnsupportedEvidenceError,
)
from bifrost.attest.policy import DEFAULT_POLICY, TdxPolicy
from bifrost.attest.tdx import TdxVerifier, parse_tdx_quote
from bifrost.attest.verdict import Evidence, verify_evidence

from .conftest import TDX_VECTORS, read, utc

VECTOR_IDS = sorted(TDX_VECTORS)


def evidence(name: str, raw: bytes | None = None, collateral: bytes | None = None) -> Evidence:
    v = TDX_VECTORS[name]
    return Evidence("tdx", raw if raw is not None else read(v.quote), {"collateral": collateral if collateral is not None else read(v.collateral)})


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def body_offset(name: str) -> int:
    return 48 if parse_tdx_quote(read(TDX_VECTORS[name].quote)).version == 4 else 54


def verify(name: str, raw: bytes | None = None, collateral: bytes | None = None, policy=DEFAULT_POLICY, at=None, **kw):
    return verify_evidence(evidence(name, raw, collateral), policy, at=at or TDX_VECTORS[name].at, **kw)


def test_dcapqvl_v4_vector_verifies_up_to_date() -> None:
    verdict = verify("dcapqvl_v4")
    assert verdict.tcb_status == "UpToDate"
    assert verdict.advisory_ids == ()
    for check in ("pck_chain", "qe_report_signature", "qe_report_binding", "quote_signature", "collateral", "tcb_level", "tdx_module"):
        assert check in verdict.checks_passed
    assert verdict.fields["fmspc"] == "b0c06f000000"
    assert verdict.measurement == parse_tdx_quote(read("tdx_quote_v4_dcapqvl.dat")).body.mr_td
    assert verdict.debug is False


@pytest.mark.parametrize("name", ["spr_e4_v4", "outdated_v5"])
def test_negative_vectors_fail_tcb_matching(name: str) -> None:
    """Manifest: signatures and chains verify, but no TCB level matches."""
    with pytest.raises(TcbError) as exc:
        verify(name)
    assert exc.value.check == TDX_VECTORS[name].expected_error == "no_matching_tcb_level"


def test_quote_parsing_v4_and_v5() -> None:
    v4 = parse_tdx_quote(read("tdx_quote_v4_spr_e4.dat"))
    assert (v4.version, v4.body_type, v4.trailing_bytes) == (4, 2, 39)
    assert v4.body.tee_tcb_svn2 is None
    v5 = parse_tdx_quote(read("tdx_quote_v5_dcapqvl_outdated.dat"))
    assert (v5.version, v5.body_type) == (5, 3)
    assert v5.body.tee_tcb_svn2 is not None and len(v5.body.mr_service_td) == 48
    for q in (v4, v5):
        assert len(q.body.mr_td) == 48 and all(len(r) == 48 for r in q.body.rtmrs) and len(q.body.report_data) == 64
        assert q.pck_chain_pem.count(b"BEGIN CERTIFICATE") == 3


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_matches_dcap_qvl(name: str) -> None:
    """Cross-check: our verdict (status, or the failing check) agrees with dcap-qvl 0.7.0."""
    import dcap_qvl  # a test dependency (pyproject: test extra): imported, never skipped
    v = TDX_VECTORS[name]
    collateral = dcap_qvl.QuoteCollateralV3.from_json(read(v.collateral).decode())
    now = calendar.timegm(v.at.utctimetuple())
    try:
        theirs = dcap_qvl.verify(read(v.quote), collateral, now).status
    except ValueError as exc:
        theirs = str(exc)
    try:
        ours = verify(name).tcb_status
    except TcbError as exc:
        ours = exc.check
    if v.expected_error is None:
        assert ours == theirs == "UpToDate"
    else:
        assert ours == "no_matching_tcb_level" and "No matching TCB level" in theirs


# ----------------------------------------------------------------------------- tamper cases


@pytest.mark.parametrize("name", VECTOR_IDS)
@pytest.mark.parametrize(
    "field,offset",
    [("tee_tcb_svn", 0), ("mr_seam", 16), ("td_attributes", 120), ("mrtd", 136), ("rtmr0", 328), ("rtmr3", 472), ("report_data", 520)],
)
def test_flipping_td_report_breaks_quote_signature(name: str, field: str, offset: int) -> None:
    raw = flip(read(TDX_VECTORS[name].quote), body_offset(name) + offset)
    with pytest.raises(SignatureError) as exc:
        verify(name, raw)
    assert exc.value.check == "quote_signature"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_flipping_header_user_data_breaks_quote_signature(name: str) -> None:
    with pytest.raises(SignatureError) as exc:
        verify(name, flip(read(TDX_VECTORS[name].quote), 40))
    assert exc.value.check == "quote_signature"


def _sig_offset(name: str) -> int:
    q = parse_tdx_quote(read(TDX_VECTORS[name].quote))
    return len(q.signed_bytes) + 4


@pytest.mark.parametrize("name", VECTOR_IDS)
@pytest.mark.parametrize("delta", [0, 31, 32, 63])
def test_flipping_quote_signature(name: str, delta: int) -> None:
    with pytest.raises(SignatureError) as exc:
        verify(name, flip(read(TDX_VECTORS[name].quote), _sig_offset(name) + delta))
    assert exc.value.check == "quote_signature"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_flipping_attestation_key_breaks_qe_binding(name: str) -> None:
    with pytest.raises(SignatureError) as exc:
        verify(name, flip(read(TDX_VECTORS[name].quote), _sig_offset(name) + 64 + 5))
    assert exc.value.check == "qe_report_binding"


@pytest.mark.parametrize("name", VECTOR_IDS)
@pytest.mark.parametrize("delta", [0, 200, 320, 383, 384, 447])  # QE report body, its REPORTDATA, its signature
def test_flipping_qe_report_or_its_signature(name: str, delta: int) -> None:
    raw = read(TDX_VECTORS[name].quote)
    start = raw.find(parse_tdx_quote(raw).qe_report.raw)
    with pytest.raises(SignatureError) as exc:
        verify(name, flip(raw, start + delta))
    assert exc.value.check == "qe_report_signature"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_flipping_qe_auth_data_breaks_binding(name: str) -> None:
    raw = read(TDX_VECTORS[name].quote)
    q = parse_tdx_quote(raw)
    start = raw.find(q.qe_report.raw) + 384 + 64 + 2
    assert len(q.qe_auth_data) > 0
    with pytest.raises(SignatureError) as exc:
        verify(name, flip(raw, start))
    assert exc.value.check == "qe_report_binding"


@pytest.mark.parametrize("name", VECTOR_IDS)
@pytest.mark.parametrize("where", [0.1, 0.3, 0.5, 0.9])
def test_flipping_pck_chain(name: str, where: float) -> None:
    raw = read(TDX_VECTORS[name].quote)
    pem = parse_tdx_quote(raw).pck_chain_pem
    start = raw.find(pem)
    offset = start + int(len(pem) * where)
    while raw[offset] in b"-\n ":
        offset += 1
    # swap a base64 character for another valid one so the PEM still decodes
    swapped = b"A" if raw[offset : offset + 1] != b"A" else b"B"
    tampered = raw[:offset] + swapped + raw[offset + 1 :]
    with pytest.raises(CertificateChainError) as exc:
        verify(name, tampered)
    assert exc.value.check == "pck_chain"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_truncation_is_format_error(name: str) -> None:
    raw = read(TDX_VECTORS[name].quote)
    end = len(raw) - parse_tdx_quote(raw).trailing_bytes
    for length in (0, 10, 47, 48, 200, 631, 700, 1100, end - 500, end - 1):
        with pytest.raises(EvidenceFormatError) as exc:
            verify(name, raw[:length])
        assert exc.value.check == "quote_format"


def test_unsupported_header_values() -> None:
    raw = read("tdx_quote_v4_dcapqvl.dat")
    for offset, value in ((0, b"\x03\x00"), (2, b"\x03\x00"), (4, b"\x00\x00\x00\x00"), (12, b"\x00")):
        with pytest.raises(UnsupportedEvidenceError):
            parse_tdx_quote(raw[:offset] + value + raw[offset + len(value) :])


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_bit_flips_anywhere_raise_typed_errors(name: str) -> None:
    raw = read(TDX_VECTORS[name].quote)
    end = len(raw) - parse_tdx_quote(raw).trailing_bytes
    for offset in range(0, end, 97):
        with pytest.raises(AttestationError):
            TdxVerifier().verify(evidence(name, flip(raw, offset, 0x80)), DEFAULT_POLICY, at=TDX_VECTORS[name].at)


# ----------------------------------------------------------------------------- collateral


def _collateral(name: str, **changes) -> bytes:
    obj = json.loads(read(TDX_VECTORS[name].collateral))
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_tampered_tcb_info_text(name: str) -> None:
    obj = json.loads(read(TDX_VECTORS[name].collateral))
    tcb_info = obj["tcb_info"].replace('"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"', 1)
    tcb_info = tcb_info if tcb_info != obj["tcb_info"] else obj["tcb_info"].replace('"pcesvn":', '"pcesvn": ', 1)
    with pytest.raises(CollateralError) as exc:
        verify(name, collateral=_collateral(name, tcb_info=tcb_info))
    assert exc.value.check == "tcb_info_signature"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_tampered_qe_identity(name: str) -> None:
    obj = json.loads(read(TDX_VECTORS[name].collateral))
    with pytest.raises(CollateralError) as exc:
        verify(name, collateral=_collateral(name, qe_identity=obj["qe_identity"].replace('"isvprodid":2', '"isvprodid":3')))
    assert exc.value.check == "qe_identity_signature"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_tampered_pck_crl(name: str) -> None:
    obj = json.loads(read(TDX_VECTORS[name].collateral))
    crl = bytearray(bytes.fromhex(obj["pck_crl"]))
    crl[-5] ^= 1
    with pytest.raises(CollateralError) as exc:
        verify(name, collateral=_collateral(name, pck_crl=crl.hex()))
    assert exc.value.check == "crl"


@pytest.mark.parametrize("name", VECTOR_IDS)
def test_tampered_tcb_signing_chain(name: str) -> None:
    obj = json.loads(read(TDX_VECTORS[name].collateral))
    chain = obj["tcb_info_issuer_chain"]
    i = chain.index("\n", 200) + 5
    chain = chain[:i] + ("A" if chain[i] != "A" else "B") + chain[i + 1 :]
    with pytest.raises(CollateralError) as exc:
        verify(name, collateral=_collateral(name, tcb_info_issuer_chain=chain))
    assert exc.value.check == "tcb_info_chain"


def test_collateral_outside_window() -> None:
    with pytest.raises((CollateralError, CertificateChainError)) as exc:
        verify("dcapqvl_v4", at=utc(2025, 8, 1))
    assert exc.value.check in ("tcb_info_expired", "qe_identity_expired", "crl")
    with pytest.raises(CollateralError) as exc:
        verify("dcapqvl_v4", at=utc(2025, 6, 1))
    assert exc.value.check == "tcb_info_expired"


def test_collateral_for_another_platform() -> None:
    with pytest.raises(AttestationError) as exc:
        verify("dcapqvl_v4", collateral=read("tdx_quote_v5_dcapqvl_outdated_collateral.json"), at=utc(2026, 3, 1))
    assert exc.value.check in ("fmspc", "pck_chain", "crl")


def test_missing_and_malformed_collateral() -> None:
    with pytest.raises(CollateralError) as exc:
        verify_evidence(Evidence("tdx", read("tdx_quote_v4_dcapqvl.dat")), DEFAULT_POLICY, at=TDX_VECTORS["dcapqvl_v4"].at)
    assert exc.value.check == "collateral_missing"
    for bad in (b"", b"[]", b"{}", b'{"tcb_info": 1}'):
        with pytest.raises(CollateralError):
            verify("dcapqvl_v4", collateral=bad)


def test_pck_chain_outside_validity() -> None:
    with pytest.raises(CertificateChainError) as exc:
        verify("dcapqvl_v4", at=utc(2024, 1, 1))
    assert exc.value.check == "pck_chain"


# ----------------------------------------------------------------------------- policy


def test_mrtd_and_rtmr_allow_lists() -> None:
    body = parse_tdx_quote(read("tdx_quote_v4_dcapqvl.dat")).body
    pinned = dataclasses.replace(DEFAULT_POLICY, tdx=TdxPolicy(mrtd=(body.mr_td,), rtmrs=((body.rtmrs[0],), (), (), ())))
    assert {"mrtd", "rtmr0"} <= set(verify("dcapqvl_v4", policy=pinned).checks_passed)
    with pytest.raises(PolicyViolationError) as exc:
        verify("dcapqvl_v4", policy=dataclasses.replace(DEFAULT_POLICY, tdx=TdxPolicy(mrtd=(bytes(48),))))
    assert exc.value.check == "mrtd"
    with pytest.raises(PolicyViolationError) as exc:
        verify("dcapqvl_v4", policy=dataclasses.replace(DEFAULT_POLICY, tdx=TdxPolicy(rtmrs=((), (), (), (b"\x01" * 48,)))))
    assert exc.value.check == "rtmr3"


def test_report_data_binding() -> None:
    body = parse_tdx_quote(read("tdx_quote_v4_dcapqvl.dat")).body
    assert "report_data" in verify("dcapqvl_v4", expected_report_data=body.report_data).checks_passed
    with pytest.raises(BindingError):
        verify("dcapqvl_v4", expected_report_data=bytes(64))


def test_tcb_status_not_allowed() -> None:
    strict = dataclasses.replace(DEFAULT_POLICY, tdx=TdxPolicy(allowed_tcb_statuses=("SWHardeningNeeded",)))
    with pytest.raises(TcbError) as exc:
        verify("dcapqvl_v4", policy=strict)
    assert exc.value.check == "tcb_status"


# ----------------------------------------------------------------------------- revocation
# No public vector has a revoked PCK: a self-made root -> PCK CA -> PCK leaf chain and CRLs built
# with `cryptography` exercise check_revocation, the function TdxVerifier runs on every quote.


@pytest.fixture(scope="module")
def pki():
    from cryptography.hazmat.primitives.asymmetric import ec

    from .x509_helpers import make_cert

    root_key, ca_key, leaf_key, tcb_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root = make_cert("Test SGX Root CA", root_key, path_length=1, key_cert_sign=True, serial=10)
    ca = make_cert("Test PCK Platform CA", ca_key, "Test SGX Root CA", root_key, path_length=0, key_cert_sign=True, serial=11)
    leaf = make_cert("Test PCK Certificate", leaf_key, "Test PCK Platform CA", ca_key, ca=False, serial=12)
    tcb_signer = make_cert("Test TCB Signing", tcb_key, "Test SGX Root CA", root_key, ca=False, serial=13)
    return {"root": (root, root_key), "ca": (ca, ca_key), "leaf": leaf, "tcb": tcb_signer}


REVOCATION_AT = utc(2030, 6, 1)
CRL_LAST_UPDATE = utc(2030, 5, 20)  # a current CRL at REVOCATION_AT


def _crls(pki, pck_revoked=(), root_revoked=(), last=CRL_LAST_UPDATE):
    from .x509_helpers import make_crl

    (root, root_key), (ca, ca_key) = pki["root"], pki["ca"]
    return make_crl(ca, ca_key, pck_revoked, last=last), make_crl(root, root_key, root_revoked, last=last)


def test_revocation_clean_chain_passes(pki) -> None:
    from bifrost.attest._x509 import verify_chain
    from bifrost.attest.tdx import check_revocation

    chain = [pki["leaf"], pki["ca"][0], pki["root"][0]]
    verify_chain(chain, ["leaf", "ca", "root"], REVOCATION_AT, check="pck_chain")
    pck_crl, root_crl = _crls(pki, pck_revoked=[999], root_revoked=[998])  # others revoked, not ours
    check_revocation(chain, pck_crl, root_crl, REVOCATION_AT, [pki["tcb"]])


@pytest.mark.parametrize("revoked", ["pck_leaf", "pck_ca", "tcb_signer"])
def test_revoked_certificate_is_refused(pki, revoked: str) -> None:
    from bifrost.attest.tdx import check_revocation

    chain = [pki["leaf"], pki["ca"][0], pki["root"][0]]
    if revoked == "pck_leaf":
        pck_crl, root_crl = _crls(pki, pck_revoked=[pki["leaf"].serial_number])
    else:
        serial = (pki["ca"][0] if revoked == "pck_ca" else pki["tcb"]).serial_number
        pck_crl, root_crl = _crls(pki, root_revoked=[serial])
    with pytest.raises(CertificateChainError) as exc:
        check_revocation(chain, pck_crl, root_crl, REVOCATION_AT, [pki["tcb"]])
    assert exc.value.check == "revoked"
    assert ("PCK CRL" if revoked == "pck_leaf" else "Root CA CRL") in exc.value.detail


def test_revocation_crl_signed_by_the_wrong_issuer_stale_or_malformed(pki) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from bifrost.attest.tdx import check_revocation

    from .x509_helpers import make_crl

    chain = [pki["leaf"], pki["ca"][0], pki["root"][0]]
    pck_crl, root_crl = _crls(pki)
    forged = make_crl(pki["ca"][0], ec.generate_private_key(ec.SECP256R1()), last=CRL_LAST_UPDATE)  # right name, wrong key
    stale_pck, stale_root = _crls(pki, last=utc(2029, 1, 1))
    for pck, root, words in (
        (forged, root_crl, "not signed by"),
        (root_crl, root_crl, "not signed by"),  # the root's CRL offered as the PCK CRL
        (stale_pck, root_crl, "outside"),
        (pck_crl, stale_root, "outside"),
        (pck_crl[:-10], root_crl, "cannot parse"),
    ):
        with pytest.raises(CollateralError) as exc:
            check_revocation(chain, pck, root, REVOCATION_AT)
        assert exc.value.check == "crl" and words in exc.value.detail
