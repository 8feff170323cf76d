"""Fuzz tests: hypothesis profile (``HYPOTHESIS_PROFILE``: ci by default, long for ``make fuzz``) and the
execution table printed at the end of the run (see :mod:`tests.fuzz.fuzzlib`)."""

from __future__ import annotations

import json
import os

from .fuzzlib import COUNTS, PROFILE, untyped


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    tr = terminalreporter
    tr.write_sep("=", f"fuzz executions (hypothesis profile {PROFILE!r})")
    total = bad = 0
    for target in sorted(COUNTS):
        counts = COUNTS[target]
        n, u = sum(counts.values()), untyped(target)
        total, bad = total + n, bad + u
        detail = ", ".join(f"{k} {v}" for k, v in counts.most_common())
        tr.write_line(f"{target:30s} {n:7d} executions, {u} untyped  ({detail})")
    tr.write_line(f"{'total':30s} {total:7d} executions, {bad} untyped")
    path = os.environ.get("BIFROST_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"profile": PROFILE, "targets": {t: dict(c) for t, c in COUNTS.items()}}, f, indent=1,
                      sort_keys=True)
