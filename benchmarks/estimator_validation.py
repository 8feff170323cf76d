"""Full-size validation of the latency estimator: GPT-2 124M, Bifrost and Bifrost+, a few prompt lengths.

    .venv/bin/python benchmarks/estimator_validation.py --profile local-2core --model gpt2 --prompt-lens 4,16

Same as `bifrost estimate validate` (one cold run per configuration, then --repeats warm runs taking turns;
the best warm TTFT / decode step is compared, the median reported) with a LocalWorker process; prints
one JSON document and a table, and writes benchmarks/results/estimator_validation_<model>.json.

This is where predicted vs measured *time* is compared (it depends on the machine's load: run it on a quiet
machine; the test suite does not assert on it). The cold run of each configuration also compares the
engine's worker traffic per forward and layer group with the model's, exactly (`traffic_checked`,
`traffic_mismatches` in the JSON); the script exits 1 if any of that differs.
"""

import argparse
import json
import sys
from pathlib import Path

from bifrost_estimator.profile import load_profile
from bifrost_estimator.report import validation_table
from bifrost_estimator.validate import run_validation


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="local-2core")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--prompt-lens", default="4,16")
    p.add_argument("--new-tokens", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    prof = load_profile(a.profile)
    rows = run_validation(prof, a.model, [int(x) for x in a.prompt_lens.split(",")], a.new_tokens, verbose=True,
                          repeats=a.repeats)
    exact = not any(r.traffic_mismatches for r in rows)
    doc = {"profile": prof.name, "profile_date": prof.source.date, "backend": prof.accelerator.backend,
           "model": a.model, "repeats": a.repeats, "traffic_as_predicted": exact,
           "results": [r.to_dict() for r in rows]}
    out = Path(__file__).resolve().parent / "results" / f"estimator_validation_{a.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))
    validation_table(rows, f"validation: {a.model} on profile {prof.name} (best / median of {a.repeats} warm runs, s)")
    if not exact:
        sys.exit(1)


if __name__ == "__main__":
    main()
