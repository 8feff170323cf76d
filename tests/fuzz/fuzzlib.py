"""Shared pieces of the fuzz tests: hypothesis profiles and budgets, an execution counter, byte mutators.

Profiles (``HYPOTHESIS_PROFILE``, default ``ci``): ``ci`` runs a modest, derandomized number of examples
per target so the default test run stays bounded; ``long`` (``make fuzz``) runs many more, randomized.
Each target draws its example budget from :data:`BUDGETS` by cost class, so expensive targets (TenSEAL,
real gRPC calls) get fewer examples than pure-Python parsers.

Every execution of a target is counted with its outcome (``ok``, the typed error's class name or gRPC
status code, or ``UNTYPED ...``); ``tests/fuzz/conftest.py`` prints the table at the end of the run (and
writes it as JSON to ``$BIFROST_FUZZ_REPORT`` when set), so a run can be reported as "N executions,
0 untyped exceptions". Executions include hypothesis' shrinking and replay passes.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, defaultdict
from types import SimpleNamespace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

_COMMON = dict(
    deadline=None,  # real gRPC calls and CKKS kernels: no per-example deadline (time is bounded by budgets)
    database=None,  # nothing written to the work tree; failures print a reproduce blob instead
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile(PROFILE)

# examples per target, by cost class (an example of a "grpc" target is one or more real RPCs plus a
# liveness call; "tenseal" ones run SEAL at N = 8192)
BUDGETS = {
    "ci": {"cheap": 500, "native": 250, "grpc": 120, "tenseal": 60},
    "long": {"cheap": 20000, "native": 8000, "grpc": 4000, "tenseal": 2000},
}


def budget(kind: str) -> settings:
    """Settings for one target of cost class ``kind`` under the active profile."""
    return settings(max_examples=BUDGETS.get(PROFILE, BUDGETS["ci"])[kind])


# ------------------------------------------------------------------------------ execution counter
COUNTS: dict[str, Counter] = defaultdict(Counter)
_LOCK = threading.Lock()


def record(target: str, outcome: str) -> None:
    with _LOCK:
        COUNTS[target][outcome] += 1


def untyped(target: str) -> int:
    return sum(n for k, n in COUNTS[target].items() if k.startswith("UNTYPED"))


def call(target: str, fn, allowed: tuple[type[BaseException], ...]):
    """Run ``fn()``; count its outcome. Returns (result, None) or (None, typed exception); any exception
    not in ``allowed`` is counted as untyped and re-raised (the test fails with hypothesis' minimal input)."""
    try:
        result = fn()
    except allowed as exc:
        record(target, type(exc).__name__)
        return None, exc
    except Exception as exc:
        record(target, f"UNTYPED {type(exc).__name__}")
        raise
    record(target, "ok")
    return result, None


class Ref(SimpleNamespace):
    """Reference material of a target (keys, genuine ciphertexts, ...) with a short repr, so a failing
    example's report shows the drawn input, not megabytes of fixtures."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {', '.join(sorted(vars(self)))}>"


# ------------------------------------------------------------------------------ byte mutators
_INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                1 << 20, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


@st.composite
def mutated(draw, blob: bytes, hot: int = 0) -> bytes:
    """``blob`` after 1-4 mutations: bit flips, byte sets, truncation, extension, insertion, deletion,
    range fills, duplicated slices, and overwriting an integer field (1/2/4/8 bytes, little- or
    big-endian, random or boundary value). Positions favour the first ``hot`` bytes (headers)."""
    data = bytearray(blob)

    def pos(extra: int = 0) -> int:
        n = len(data) + extra
        if n <= 0:
            return 0
        if hot and draw(st.booleans()):
            return draw(st.integers(0, min(hot, n) - 1))
        return draw(st.integers(0, n - 1))

    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete", "fill", "dup", "int"]))
        if op == "flip" and data:
            i = pos()
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos()] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos(1):]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "insert":
            i = pos(1)
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete" and data:
            i = pos()
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "fill" and data:
            i, k = pos(), draw(st.integers(1, 256))
            data[i:i + k] = bytes([draw(st.sampled_from([0, 0xFF]))]) * len(data[i:i + k])
        elif op == "dup" and data:
            i = pos()
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
        elif op == "int" and data:
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.one_of(st.sampled_from(_INTERESTING), st.integers(0, (1 << 64) - 1))) % (1 << 8 * width)
            i = pos()
            data[i:i + width] = value.to_bytes(width, draw(st.sampled_from(["little", "big"])))
    return bytes(data)


LIST_EDITS = ("mutate", "mutate", "drop", "dup", "swap", "junk", "pool")


def edit(draw, cts: list, op: str, pool: list[bytes], hot: int = 0) -> None:
    """One edit (a :data:`LIST_EDITS` name) of a list of ciphertexts, in place: mutate one, drop one,
    duplicate one, swap the first and last, insert junk, or insert one from ``pool``."""
    i = draw(st.integers(0, max(0, len(cts) - 1)))
    if op == "mutate" and cts:
        cts[i] = draw(mutated(cts[i], hot=hot))
    elif op == "drop" and cts:
        del cts[i]
    elif op == "dup" and cts:
        cts.insert(i, cts[i])
    elif op == "swap" and len(cts) > 1:
        cts[0], cts[-1] = cts[-1], cts[0]
    elif op == "junk":
        cts.insert(i, draw(junk(256)))
    elif op == "pool":
        cts.insert(i, draw(st.sampled_from(pool)))


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked with the given integer weights. (``st.one_of`` merges repeated
    branches, so repeating a strategy there does not weight it; ``sampled_from`` does.)"""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(table))).flatmap(lambda i: table[i])


def junk(max_size: int = 512) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size)


# protobuf string fields must be valid UTF-8 (surrogates cannot be sent)
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
