"""Full-size validation of the latency estimator: GPT-2 124M shape, Bifrost and Bifrost+, a few prompt lengths.

    .venv/bin/python benchmarks/estimator_validation.py --profile local-2core --model gpt2 --prompt-lens 4,16

Same as `bifrost estimate validate` (warm runs: each configuration is generated twice, the second is
compared; the cold first run is reported too) but prints one JSON document for the record.
"""

import argparse
import json

from bifrost_estimator.profile import load_profile
from bifrost_estimator.validate import run_validation


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="local-2core")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--prompt-lens", default="4,16")
    p.add_argument("--new-tokens", type=int, default=3)
    a = p.parse_args()
    prof = load_profile(a.profile)
    rows = run_validation(prof, a.model, [int(x) for x in a.prompt_lens.split(",")], a.new_tokens, verbose=True)
    print(json.dumps({"profile": prof.name, "backend": prof.accelerator.backend, "model": a.model,
                      "results": [r.to_dict() for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
