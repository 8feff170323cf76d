"""``bifrost estimate`` (also ``bifrost-estimate``): latency projections for fhe / bifrost / bifrost+,
calibration and validation.

    bifrost estimate [MODEL] --profile P --scheme fhe|bifrost|bifrost+|all --prompt-len L --new-tokens T
                     [--batch B] [--layers-only] [--fhe-recipe KEY=VALUE ...] [--json] [--plot out.png]
    bifrost estimate calibrate --out configs/hardware/<name>.yaml [--force] [--quick] [--no-fhe] [--backend B]
    bifrost estimate validate [--profile P] [--model gpt2-2l] [--prompt-lens 4,16] [--new-tokens 3] [--json]
                              [--address HOST:PORT --worker-cert PEM]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from bifrost.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="project latency of fhe / bifrost / bifrost+ from a hardware profile",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="catalog name (gpt2, gpt2-xl, qwen3-0.6b, llama3-8b, ...) or a config.json / checkpoint "
                        "directory (default gpt2; or give it with --model, as every other command takes it); or the "
                        "sub-command 'calibrate' / 'validate'")
    p.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the model to estimate, or with 'validate' the model to run (default gpt2-2l)")
    g = p.add_argument_group("estimate")
    g.add_argument("--profile", default=None, help="profile name in configs/hardware/ or a YAML path "
                                                     "(default: local-2core)")
    g.add_argument("--scheme", default="all", help="fhe | bifrost | bifrost+ | all (default)")
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=None, help="default 32 (estimate), 3 (validate)")
    g.add_argument("--batch", type=int, default=1, help="sequences sharing each forward (costs reported per sequence)")
    g.add_argument("--layers-only", action="store_true",
                   help="decoder layers only: drop final norm, LM head, sampling and per-forward overhead")
    g.add_argument("--fhe-recipe", action="append", default=[], metavar="KEY=VALUE",
                   help="override an fhe recipe field (e.g. bootstrapping=false, softmax_inverse_iters=3); repeatable")
    g.add_argument("--linear-packing", default="backend", choices=("backend", "column"),
                   help="Bifrost's delegated layers with the backend's own plan (default) or Euston's column "
                        "packing (what-if)")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")
    g.add_argument("--plot", default=None, metavar="OUT.png", help="write stacked bars of the breakdown")
    c = p.add_argument_group("calibrate")
    c.add_argument("--out", default=None, help="output YAML, e.g. configs/hardware/local-2core.yaml")
    c.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    c.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    c.add_argument("--backend", default=None, help="CKKS backend to model (default: the run config's)")
    c.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (FHE ops still run; see --no-fhe)")
    c.add_argument("--no-fhe", action="store_true", help="skip the deep-context ops of the fhe baseline (slow)")
    c.add_argument("--verbose", action="store_true")
    v = p.add_argument_group("validate")
    v.add_argument("--prompt-lens", default="4,16", help="comma-separated prompt lengths (validate)")
    v.add_argument("--repeats", type=int, default=3,
                   help="warm runs per point; the best is compared, the median reported (validate)")
    v.add_argument("--modes", default="bifrost,bifrost+")
    v.add_argument("--address", default=None, help="use a running worker instead of starting one (validate)")
    v.add_argument("--worker-cert", default=None, help="that worker's certificate (PEM), pinned (validate)")
    p.set_defaults(func=_dispatch)


def _dispatch(args) -> int:
    if args.model == "calibrate":
        return _calibrate(args)
    if args.model == "validate":
        args.val_model = args.model_option or "gpt2-2l"
        return _validate(args)
    if args.model is not None and args.model_option is not None and args.model != args.model_option:
        raise UserError(f"two models given: {args.model!r} and --model {args.model_option!r}; give one")
    args.model = args.model or args.model_option or "gpt2"
    return _estimate(args)


def _estimate(args) -> int:
    if args.new_tokens is None:
        args.new_tokens = 32
    from .model import SCHEMES, FHEAlgorithms, estimate, with_overrides
    from .profile import load_profile
    from .report import plot, print_tables, to_json
    from .shapes import load_shape

    schemes = list(SCHEMES) if args.scheme == "all" else [args.scheme]
    if any(s not in SCHEMES for s in schemes):
        raise UserError(f"unknown scheme {args.scheme!r}; choose fhe, bifrost, bifrost+ or all")
    if args.plot:
        check_plot_path(args.plot)
    alg = with_overrides(FHEAlgorithms(), args.fhe_recipe)
    profile = load_profile(args.profile)
    shape = load_shape(args.model)
    if args.scheme == "all" and profile.fhe is None:
        schemes.remove("fhe")
    ests = [estimate(profile, shape, s, args.prompt_len, args.new_tokens, args.batch, args.layers_only, alg,
                     args.linear_packing) for s in schemes]
    if args.json:
        extra = {"model_shape": shape.__dict__, "linear_macs_per_token": shape.linear_macs_per_token(),
                 "profile_source": profile.source.__dict__, "linear_packing": args.linear_packing}
        if "fhe" in schemes:
            extra["fhe_recipe"] = alg.to_dict(shape)
        print(to_json(ests, extra))
    else:
        print_tables(ests)
        if "fhe" in schemes and len(ests) > 1:
            fhe = next(e for e in ests if e.scheme == "fhe")
            for e in ests:
                if e.scheme != "fhe":
                    print(f"speedup {e.scheme} vs fhe: TTFT {fhe.ttft_s / e.ttft_s:.2f}x, per token "
                          f"{fhe.per_token_s / e.per_token_s:.2f}x, total {fhe.total_s / e.total_s:.2f}x")
    if args.plot:
        plot(ests, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def _calibrate(args) -> int:
    if not args.out:
        raise UserError("calibrate needs --out PATH.yaml")
    out = Path(args.out)
    if out.suffix not in (".yaml", ".yml"):
        raise UserError(f"--out {out}: a profile is a .yaml file")
    if out.exists() and not args.force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it")
    check_writable_dir(out)
    from .calibrate import calibrate
    from .profile import dump_profile

    command = "bifrost estimate " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("calibrate"):]) \
        if "calibrate" in sys.argv else f"bifrost estimate calibrate --out {args.out}"
    profile, report = calibrate(args.name or out.stem, quick=args.quick, fhe=not args.no_fhe, verbose=args.verbose,
                                command=command, backend=args.backend)
    fit = "\n".join(f"#   {r['d_in']}->{r['d_outs']} x{r['rows']}: apply measured {r['apply_measured_s'] * 1e3:.2f} ms, "
                    f"model {r['apply_model_s'] * 1e3:.2f} ms ({r['error']:+.1%})" for r in report["linear_fit"])
    header = (f"# Hardware profile MEASURED on this machine by `{command}`\n# on {profile.source.date}; "
              f"calibration took {report['seconds']:.0f} s. Linear-layer fit (apply):\n{fit}\n")
    dump_profile(profile, out, header)
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


def check_writable_dir(path: Path) -> None:
    """Fail now, with one line, if ``path`` cannot be created (before minutes of work, not after)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{path}: directory {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".bifrost-write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"{path}: cannot write in {parent} ({exc.strerror or exc})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{path}: not writable")


def check_plot_path(path: str) -> None:
    from .report import PLOT_FORMATS

    p = Path(path)
    if p.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise UserError(f"--plot {path}: unsupported format {p.suffix or '(none)'!r}; use one of "
                           f"{', '.join('.' + f for f in PLOT_FORMATS)}")
    check_writable_dir(p)


def _validate(args) -> int:
    args.model = args.val_model
    if args.new_tokens is None:
        args.new_tokens = 3
    from .profile import load_profile
    from .validate import run_validation

    profile = load_profile(args.profile)
    try:
        lens = [int(x) for x in args.prompt_lens.split(",") if x]
    except ValueError:
        raise UserError(f"--prompt-lens must be comma-separated integers, got {args.prompt_lens!r}") from None
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in ("bifrost", "bifrost+") for m in modes):
        raise UserError(f"--modes must be bifrost and/or bifrost+, got {args.modes!r}")
    endpoint = None
    if args.address:
        from bifrost.attest.mtls import WorkerEndpoint

        if not args.worker_cert:
            raise UserError(f"worker {args.address}: give its certificate to pin with --worker-cert")
        endpoint = WorkerEndpoint.from_files(args.address, args.worker_cert)
    rows = run_validation(profile, args.model, lens, args.new_tokens, modes, endpoint, verbose=not args.json,
                          repeats=args.repeats)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        from .report import validation_table

        validation_table(rows, f"validation: {args.model} on profile {profile.name} (best / median of {args.repeats} "
                               f"warm runs, seconds)")
    return 1 if any(r.traffic_mismatches for r in rows) else 0  # times are reported; the traffic must be exact


def main(argv: list[str] | None = None) -> int:  # ``bifrost-estimate`` (pyproject) / ``python -m bifrost_estimator.cli``
    from bifrost.cli import main as bifrost_main

    return bifrost_main(["estimate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
