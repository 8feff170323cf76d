"""Shared by the benchmark scripts: write a report as JSON (with its command line) and say where."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_report(path: str, report: dict) -> None:
    report = {"command": " ".join(["python", *sys.argv]), **report}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
