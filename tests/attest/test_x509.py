"""Malformed certificates and CRLs always end as a typed AttestationError.

Systematic DER byte flips (every tag/length byte, plus strided value bytes) in otherwise valid
certificates and CRLs, run through the full verifiers: the SEV-SNP leaf (VCEK/VLEK), ASK/ASVK and
ARK; the PCK chain inside a TDX quote (unsigned: anyone who alters a quote controls it); the
collateral issuer chains and CRLs. A flip may only be *accepted* when it lies outside the signed
part (TBSCertificate / TBSCertList), e.g. the unused-bits byte of the outer signature BIT STRING.
Also: CA constraints on issuers (basicConstraints, path length, keyCertSign).
"""

from __future__ import annotations

import json
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from bifrost.attest._x509 import load_certificate, load_crl, load_pem_chain, verify_chain
from bifrost.attest.errors import AttestationError, CertificateChainError, CollateralError
from bifrost.attest.policy import DEFAULT_POLICY, AttestationPolicy, SnpPolicy
from bifrost.attest.tdx import parse_tdx_quote
from bifrost.attest.verdict import Evidence, verify_evidence

from .conftest import DATA, SNP_VECTORS, TDX_VECTORS, read, utc
from .x509_helpers import (
    der,
    flip_cases,
    flipped,
    make_cert,
    pem,
    pem_blocks_der,
    replace_pem_block,
    signed_range,
)

LENIENT = AttestationPolicy(allow_debug=True, snp=SnpPolicy(allowed_vmpls=(0, 1)))
FLIPS_PER_OBJECT = 200  # per certificate / CRL: most DER tag/length bytes (thinned evenly); a few seconds in all


def _load_any(data: bytes) -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD VCEK serial 0
        return x509.load_pem_x509_certificate(data) if data.startswith(b"-----") else x509.load_der_x509_certificate(data)


def _assert_refused_or_unsigned_byte(verify, data: bytes, signed: range, what: str) -> int:
    """Flip bytes of ``data``; ``verify(tampered)`` must raise AttestationError, or accept only when
    the flipped byte is outside ``signed``. Returns how many flips were tried."""
    cases = flip_cases(data, FLIPS_PER_OBJECT)
    for offset, mask in cases:
        try:
            verify(flipped(data, offset, mask))
        except AttestationError:
            continue
        assert offset not in signed, f"{what}: flipping byte {offset} (^{mask:#x}) inside the signed part was accepted"
    return len(cases)


# ----------------------------------------------------------------------------- SEV-SNP


@pytest.mark.parametrize("name", sorted(SNP_VECTORS))
@pytest.mark.parametrize("which", ["leaf", "ask", "ark"])
def test_snp_certificate_byte_flips(name: str, which: str) -> None:
    v = SNP_VECTORS[name]
    report, chain_pem = read(v.report), read(v.chain)
    leaf_der = der(_load_any(read(v.leaf)))
    ask_der, ark_der = pem_blocks_der(chain_pem)
    target = {"leaf": leaf_der, "ask": ask_der, "ark": ark_der}[which]

    def verify(tampered: bytes) -> None:
        leaf, chain = leaf_der, chain_pem
        if which == "leaf":
            leaf = tampered
        else:
            chain = replace_pem_block(chain_pem, 0 if which == "ask" else 1, tampered)
        verify_evidence(Evidence("sev-snp", report, {v.leaf_kind: leaf, "cert_chain": chain}), LENIENT, at=v.at)

    verify(target)  # untampered baseline verifies
    tbs = _load_any(target).tbs_certificate_bytes
    assert _assert_refused_or_unsigned_byte(verify, target, signed_range(target, tbs), f"{name} {which}") >= 60


def test_milan_vcek_byte_252_is_a_parse_error_in_the_cli(capsys, tmp_path) -> None:
    """The audit's reproducer: a lazily parsed subject used to escape as a ValueError traceback."""
    from bifrost.cli import main

    bad = tmp_path / "vcek.der"
    bad.write_bytes(flipped(read("snp_milan_vcek.der"), 252, 0x01))
    v = SNP_VECTORS["milan_vcek_v2"]
    code = main(["attest", "verify", str(DATA / v.report), "--vcek", str(bad), "--at", "2024-01-01"])
    out = capsys.readouterr().out
    assert code == 1 and "failed check: cert_parse (CertificateChainError)" in out and "Traceback" not in out


# ----------------------------------------------------------------------------- TDX PCK chain

TDX = TDX_VECTORS["dcapqvl_v4"]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["pck-leaf", "pck-ca", "root"])
def test_tdx_pck_chain_byte_flips(index: int) -> None:
    quote = read(TDX.quote)
    chain_pem = parse_tdx_quote(quote).pck_chain_pem
    target = pem_blocks_der(chain_pem)[index]

    def verify(tampered: bytes) -> None:
        new_chain = replace_pem_block(chain_pem, index, tampered)
        assert len(new_chain) == len(chain_pem)  # same DER length -> same PEM length -> quote sizes still right
        raw = quote.replace(chain_pem, new_chain)
        verify_evidence(Evidence("tdx", raw, {"collateral": read(TDX.collateral)}), DEFAULT_POLICY, at=TDX.at)

    verify(target)
    tbs = x509.load_der_x509_certificate(target).tbs_certificate_bytes
    _assert_refused_or_unsigned_byte(verify, target, signed_range(target, tbs), f"PCK chain [{index}]")


# ----------------------------------------------------------------------------- TDX collateral


def _collateral_verify(key: str, transform):
    base = json.loads(read(TDX.collateral))

    def verify(tampered: bytes) -> None:
        obj = dict(base)
        obj[key] = transform(base[key], tampered)
        verify_evidence(Evidence("tdx", read(TDX.quote), {"collateral": json.dumps(obj).encode()}), DEFAULT_POLICY, at=TDX.at)

    return base, verify


@pytest.mark.parametrize("key", ["tcb_info_issuer_chain", "qe_identity_issuer_chain", "pck_crl_issuer_chain"])
def test_collateral_issuer_chain_byte_flips(key: str) -> None:
    base, verify = _collateral_verify(key, lambda text, new: replace_pem_block(text.encode(), 0, new).decode())
    target = pem_blocks_der(base[key].encode())[0]  # the signing leaf (TCB signing cert / PCK CA)
    verify(target)
    tbs = x509.load_der_x509_certificate(target).tbs_certificate_bytes
    _assert_refused_or_unsigned_byte(verify, target, signed_range(target, tbs), key)


@pytest.mark.parametrize("key", ["root_ca_crl", "pck_crl"])
def test_collateral_crl_byte_flips(key: str) -> None:
    base, verify = _collateral_verify(key, lambda _old, new: new.hex())
    target = bytes.fromhex(base[key])
    verify(target)
    tbs = x509.load_der_x509_crl(target).tbs_certlist_bytes
    _assert_refused_or_unsigned_byte(verify, target, signed_range(target, tbs), key)


@pytest.mark.parametrize("key", ["tcb_info", "tcb_info_issuer_chain", "qe_identity", "qe_identity_issuer_chain", "pck_crl_issuer_chain"])
def test_collateral_string_not_encodable_as_utf8(key: str) -> None:
    """JSON may carry a lone surrogate ("\\ud800"): it must be a CollateralError, not UnicodeEncodeError."""
    obj = json.loads(read(TDX.collateral))
    obj[key] = obj[key][:10] + "\ud800" + obj[key][10:]
    text = json.dumps(obj)  # ensure_ascii: the surrogate travels as the escape \ud800
    assert "\\ud800" in text
    with pytest.raises(CollateralError) as exc:
        verify_evidence(Evidence("tdx", read(TDX.quote), {"collateral": text.encode()}), DEFAULT_POLICY, at=TDX.at)
    assert exc.value.check == "collateral_format" and key in exc.value.detail


def test_collateral_deeply_nested_json_is_a_format_error() -> None:
    with pytest.raises(CollateralError) as exc:
        verify_evidence(Evidence("tdx", read(TDX.quote), {"collateral": b"[" * 100_000}), DEFAULT_POLICY, at=TDX.at)
    assert exc.value.check == "collateral_format"


# ----------------------------------------------------------------------------- loaders and CA rules


@pytest.mark.parametrize("data", [b"", b"\x30\x03\x02\x01", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"\xff" * 40])
def test_loaders_refuse_garbage(data: bytes) -> None:
    with pytest.raises(CertificateChainError):
        load_certificate(data, "test")
    with pytest.raises(CollateralError):
        load_crl(data, "test CRL")


def test_loader_error_type_and_check_are_the_callers() -> None:
    with pytest.raises(CollateralError) as exc:
        load_pem_chain(pem(flipped(read("snp_milan_vcek.der"), 252, 0x01)), "chain", CollateralError, "tcb_info_chain")
    assert exc.value.check == "tcb_info_chain"


@pytest.fixture(scope="module")
def keys():
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]


AT = utc(2030, 1, 1)


def test_self_made_chain_verifies(keys) -> None:
    root = make_cert("root", keys[0], path_length=1, key_cert_sign=True)
    ca = make_cert("ca", keys[1], "root", keys[0], path_length=0, key_cert_sign=True, serial=2)
    leaf = make_cert("leaf", keys[2], "ca", keys[1], ca=False, serial=3)
    verify_chain([leaf, ca, root], ["leaf", "ca", "root"], AT)


@pytest.mark.parametrize(
    "ca_kwargs,message",
    [
        ({"ca": False}, "not a CA"),
        ({"ca": None}, "no basicConstraints"),
        ({"key_cert_sign": False}, "keyCertSign"),
    ],
    ids=["ca-false", "no-basic-constraints", "no-key-cert-sign"],
)
def test_issuer_must_be_a_ca(keys, ca_kwargs, message: str) -> None:
    """A correctly signed chain whose intermediate is not a CA is refused."""
    root = make_cert("root", keys[0], path_length=1, key_cert_sign=True)
    kwargs = {"path_length": 0, "key_cert_sign": True, **ca_kwargs}
    ca = make_cert("ca", keys[1], "root", keys[0], serial=2, **kwargs)
    leaf = make_cert("leaf", keys[2], "ca", keys[1], ca=False, serial=3)
    with pytest.raises(CertificateChainError) as exc:
        verify_chain([leaf, ca, root], ["leaf", "ca", "root"], AT, check="pck_chain")
    assert exc.value.check == "pck_chain" and message in exc.value.detail


def test_path_length_is_enforced(keys) -> None:
    root = make_cert("root", keys[0], path_length=0, key_cert_sign=True)  # admits no intermediate CA
    ca = make_cert("ca", keys[1], "root", keys[0], path_length=0, key_cert_sign=True, serial=2)
    leaf = make_cert("leaf", keys[2], "ca", keys[1], ca=False, serial=3)
    with pytest.raises(CertificateChainError) as exc:
        verify_chain([leaf, ca, root], ["leaf", "ca", "root"], AT)
    assert "path length" in exc.value.detail
