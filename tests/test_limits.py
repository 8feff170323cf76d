"""bifrost/limits.py is the one statement of the limits: the README's table is its rendering, every value it
names exists where it says (config field, shipped YAML, constant), the digest column matches the serving-config
digest, every test it names exists, and new limits are validated at load. Also the unit-level limits."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bifrost.config import WorkerConfig
from bifrost.errors import UserError
from bifrost.limits import LIMITS, by_source, format_value, markdown_table
from bifrost.serve.config import ServeConfig, load_serve_config, serving_config
from bifrost.yaml_io import load_yaml

ROOT = Path(__file__).resolve().parent.parent


def _readme_limits_table() -> str:
    text = (ROOT / "README.md").read_text()
    lines = text.split("### Limits\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])  # the first table under the heading


def test_readme_table_is_the_module_table():
    assert _readme_limits_table() == markdown_table()
    assert len(markdown_table().splitlines()) == len(LIMITS) + 2


def test_config_limits_are_fields_and_the_shipped_yaml_agrees():
    shipped = {"serve": load_yaml(ROOT / "configs/serve.yaml"), "worker": load_yaml(ROOT / "configs/default.yaml")["worker"]}
    fields = {"serve": {f.name for f in dataclasses.fields(ServeConfig)},
              "worker": {f.name for f in dataclasses.fields(WorkerConfig)}}
    for limit in LIMITS:
        if limit.is_config_key:
            section, name = limit.source.split(".")
            assert name in fields[section], limit.source
            assert shipped[section][name] == limit.default(), limit.source
        else:
            assert isinstance(limit.default(), int) and limit.default() > 0, limit.source


def test_every_max_setting_is_in_the_table():
    """A new ``max_*`` setting (or worker cache size) cannot be added without its row."""
    sources = {limit.source for limit in LIMITS}
    for cls, section in ((ServeConfig, "serve"), (WorkerConfig, "worker")):
        for f in dataclasses.fields(cls):
            if f.name.startswith("max_") or f.name.endswith("_bytes"):
                assert f"{section}.{f.name}" in sources, f"{section}.{f.name} missing from bifrost/limits.py"


def test_digest_column_matches_the_serving_config(run_config):
    bound = serving_config(run_config, load_serve_config())
    for limit in LIMITS:
        if limit.source.startswith("serve."):
            assert (limit.source.split(".")[1] in bound) == limit.digest, limit.source
        else:
            assert not limit.digest, limit.source


def test_every_named_test_exists():
    for limit in LIMITS:
        path, name = limit.test.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), limit.test


def test_format_value():
    assert format_value(None) == "null" and format_value(32) == "32"
    assert format_value(1 << 20) == "1048576 (1 MiB)" and format_value(12 << 30) == "12884901888 (12 GiB)"
    assert by_source("serve.max_sessions").default() == ServeConfig().max_sessions


@pytest.mark.parametrize("key, value", [("max_concurrent_rpcs", 0), ("max_turns_per_session", 0),
                                        ("max_sessions_per_replica", 0), ("max_context_tokens", 0),
                                        ("max_context_tokens", -5)])
def test_new_limits_are_validated_at_load(tmp_path, key, value):
    p = tmp_path / "serve.yaml"
    p.write_text(f"{key}: {value}\n")
    with pytest.raises(UserError) as err:
        load_serve_config(p)
    assert f"serve.{key} must be >= 1" in str(err.value) and "\n" not in str(err.value)


def test_replica_sessions_is_the_per_replica_limit_capped_by_max_sessions():
    assert ServeConfig().replica_sessions == ServeConfig().max_sessions
    assert ServeConfig(max_sessions_per_replica=3).replica_sessions == 3
    assert ServeConfig(max_sessions=4, max_sessions_per_replica=9).replica_sessions == 4


def test_turns_are_counted_exactly_and_unopened_ones_are_not():
    from bifrost.serve.sessions import SessionTable, TurnLimitError

    table = SessionTable(4, 1, max_turns=2)
    r = table.reserve()
    table.commit(r, b"s" * 16, b"")
    assert table.begin(b"s" * 16, turn=True) and table.begin(b"s" * 16, turn=True)  # two at once
    with pytest.raises(TurnLimitError, match="max_turns_per_session=2"):
        table.begin(b"s" * 16, turn=True)
    table.end(b"s" * 16, opened=False, turn=True)  # never opened: not a turn
    assert table.begin(b"s" * 16, turn=True) is not None
    table.end(b"s" * 16, opened=True, turn=True)
    table.end(b"s" * 16, opened=True, turn=True)
    with pytest.raises(TurnLimitError):
        table.begin(b"s" * 16, turn=True)
    assert table.begin(b"s" * 16) is not None  # other requests (Embed) are not turns


def test_sessions_per_replica_spread_and_refuse():
    from bifrost.serve.sessions import SessionLimitError, SessionTable

    table = SessionTable(10, 2, max_per_replica=2)
    placed = [table.reserve() for _ in range(4)]
    assert sorted(placed) == [0, 0, 1, 1]
    with pytest.raises(SessionLimitError, match="max_sessions_per_replica=2"):
        table.reserve()
    table.cancel(0)
    assert table.reserve() == 0


def test_embed_past_max_embed_texts_is_rejected():
    """The replica refuses it sealed (Rejected has no cleartext form; the sealing: tests/serve/test_bad_input.py)."""
    from bifrost.model.tokenizer import ByteTokenizer
    from bifrost.proto import serving_pb2
    from bifrost.proto.replica import Status
    from bifrost.tee.scheduler import Sampling
    from bifrost.tee.validation import MAX_EMBED_TEXTS, Limits, Rejected, check_embed

    limits = Limits("minilm", "encoder", 0, 0, 8, 8, 16, Sampling(False, 1.0, 0, 1.0))
    assert len(check_embed(serving_pb2.EmbedBody(texts=["a"] * MAX_EMBED_TEXTS), ByteTokenizer(), limits)) == 64
    with pytest.raises(Rejected) as exc:
        check_embed(serving_pb2.EmbedBody(texts=["a"] * (MAX_EMBED_TEXTS + 1)), ByteTokenizer(), limits)
    assert exc.value.status is Status.INVALID_ARGUMENT and f"1..{MAX_EMBED_TEXTS} texts" in exc.value.reason
