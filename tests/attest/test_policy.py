"""Policy YAML loading and validation."""

from __future__ import annotations

import pytest

from bifrost.attest.errors import PolicyConfigError
from bifrost.attest.policy import DEFAULT_POLICY, load_policy, policy_from_mapping


def test_default_policy_is_strict() -> None:
    assert DEFAULT_POLICY.allow_simulated is False
    assert DEFAULT_POLICY.allow_debug is False
    assert DEFAULT_POLICY.snp.allowed_vmpls == (0,)
    assert DEFAULT_POLICY.tdx.allowed_tcb_statuses == ("UpToDate",)


def test_full_policy_loads(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"""
allow_debug: true
model_digests: ["{'ab' * 32}"]
snp:
  allowed_vmpls: [0, 1]
  measurements: ["{'cd' * 48}"]
  min_tcb: {{bootloader: 2, snp: 5}}
tdx:
  allowed_tcb_statuses: [UpToDate, SWHardeningNeeded]
  mrtd: ["{'ef' * 48}"]
  rtmr2: ["{'01' * 48}"]
"""
    )
    p = load_policy(path)
    assert p.allow_debug and not p.allow_simulated
    assert p.model_digests == (b"\xab" * 32,)
    assert p.snp.allowed_vmpls == (0, 1) and p.snp.measurements == (b"\xcd" * 48,)
    assert dict(p.snp.min_tcb) == {"bootloader": 2, "snp": 5}
    assert p.tdx.allowed_tcb_statuses == ("UpToDate", "SWHardeningNeeded")
    assert p.tdx.mrtd == (b"\xef" * 48,) and p.tdx.rtmrs[2] == (b"\x01" * 48,) and p.tdx.rtmrs[0] == ()


@pytest.mark.parametrize(
    "data,check",
    [
        ({"allow_simulatd": True}, "policy_unknown_key"),
        ({"snp": {"measurement": []}}, "policy_unknown_key"),
        ({"tdx": {"rtmr4": []}}, "policy_unknown_key"),
        ({"snp": {"min_tcb": {"ucode": 1}}}, "policy_unknown_key"),
        ({"allow_debug": "yes"}, "policy_type"),
        ({"snp": {"measurements": ["ab"]}}, "policy_hex"),
        ({"snp": {"measurements": ["zz" * 48]}}, "policy_hex"),
        ({"snp": {"measurements": "ab"}}, "policy_type"),
        ({"snp": {"allowed_vmpls": [-1]}}, "policy_type"),
        ({"tdx": {"allowed_tcb_statuses": ["Fine"]}}, "policy_type"),
        ([1, 2], "policy_format"),
    ],
)
def test_invalid_policies(data, check: str) -> None:
    with pytest.raises(PolicyConfigError) as exc:
        policy_from_mapping(data)
    assert exc.value.check == check


def test_unknown_key_message_names_the_key(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("allow_simulatd: true\n")
    with pytest.raises(PolicyConfigError, match="allow_simulatd"):
        load_policy(path)


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("snp: [unclosed\n")
    with pytest.raises(PolicyConfigError) as exc:
        load_policy(path)
    assert exc.value.check == "policy_yaml"
    with pytest.raises(PolicyConfigError) as exc:
        load_policy(tmp_path / "missing.yaml")
    assert exc.value.check == "policy_read"


def test_empty_file_is_default(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("")
    assert load_policy(path) == DEFAULT_POLICY
