"""Shared by the benchmark scripts: write a report as JSON (with its command line) and say where; make a checkout
the imported build."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_report(path: str, report: dict) -> None:
    report = {"command": " ".join(["python", *sys.argv]), **report}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


# A checkout's packages under the names they are installed as (pyproject: kernels/ is bifrost_kernels, …)
PACKAGE_LINKS = {"bifrost": "bifrost", "bifrost_kernels": "kernels", "bifrost_estimator": "estimator"}


def link_packages(checkout: Path, folder: Path) -> Path:
    """``folder`` (created if missing) holding links to ``checkout``'s packages under their installed names: put
    first on a path, it makes that checkout the imported build whatever is installed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in PACKAGE_LINKS.items():
        (folder / name).symlink_to(Path(checkout).resolve() / target, target_is_directory=True)
    return folder
