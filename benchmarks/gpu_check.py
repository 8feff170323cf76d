"""GPU check of the native CKKS worker (issue 17, deliverable 4): one short run on a lent CUDA machine — not a test.

Three steps, in order, into ONE JSON document (stdout; also ``--out``, default ``$OUT/gpu_check.json`` when
``$OUT`` is set, rewritten after every step so a run cut short still leaves what it measured):

1. ``tests``: pytest over ``tests/kernels`` with ``BIFROST_KERNELS_DEVICE=<device>`` (the evaluator device its
   fixtures and primitive tests use): passed / failed / errors / skipped counts, failing node ids, and the tests
   deselected because a package they need is absent on the machine (:data:`DESELECT`, none today).
2. ``shapes``: ``benchmarks/kernels_bench.py``'s per-shape benchmark (its :func:`measure`: one decode row through
   each GPT-2 / Qwen3 layer shape, worker ``apply`` on ``<device>``, trusted encrypt/decrypt/verify on the CPU;
   median seconds over ``--repeats``, bytes) and its per-token projections.
3. ``decode``: the worker's cost of one decode token for GPT-2 124M (``gpt2``) and Qwen3-0.6B (``qwen3-0.6b``):
   the model of ``configs/models.yaml`` with the run config's seeded weights, placement policy and fusion (the
   groups the trusted engine sends), every delegated layer group prepared on ``<device>``; per token, each group's
   input is freshly encrypted as the trusted side does (``NativeTrustedContext.encrypt``, one row) and the worker
   applies the group (``NativeEvaluator.apply``: unpack, kernel, pack; gRPC not included). Reports worker
   seconds per token (sum over groups; median and best over ``--tokens`` tokens after one warm-up token) and its
   split into unpack / kernel / pack (:func:`time_stages`), bytes up (input ciphertexts) and down (output
   ciphertexts) per token, the one-off prepare time and memory, and the
   largest error of the last token's decrypted products over the backend's worst-case bound (must be < 1).

``machine`` names the device (``torch.cuda.get_device_name``), torch and its CUDA build; ``imports`` lists every
third-party distribution the check and its test process imported, and any absent from the machine's package
list (``benchmarks/gpu_packages.txt``) and the carried wheels (``benchmarks/gpu_wheels.txt``). The exit status is
0 only when every step ran, every test passed, every error stayed within its bound and no import is missing there;
1 otherwise (``problems`` says why); 2 when the check cannot start (one line on stderr: ``--device cuda`` without
CUDA, or a wheel not installed).

The repository is not installed on the GPU machine: the script links ``kernels/`` and ``estimator/`` as
``bifrost_kernels`` / ``bifrost_estimator`` (and ``bifrost/``) in a temporary folder put first on ``sys.path``,
and runs from the repository root. That machine has Python 3.12, torch 2.11 with CUDA, numpy, pyyaml,
transformers, pytest, ...; it lacks ``cryptography`` (with ``cffi``, ``pycparser``), which travel as wheels:

    bash benchmarks/gpu_wheels.sh      # here, once: the pins of benchmarks/gpu_wheels.txt into .whl/, i.e.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        cryptography==50.0.2 cffi==2.1.1 pycparser==3.12

then, through the device tool, ``run`` with ``carry: [".whl"]`` and the command
``bash benchmarks/gpu_check.sh`` (installs ``.whl/*.whl`` into a private folder, then runs this script; sized
for 2–3 minutes on an H200, timeout_s 420; not yet timed there). Here: ``python benchmarks/gpu_check.py --device cpu --quick`` (tiny models, one shape).

    python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--steps tests shapes decode]
                                   [--models gpt2 qwen3-0.6b] [--tokens 5] [--repeats 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEVICE_PACKAGES = BENCH / "gpu_packages.txt"
WHEELS = BENCH / "gpu_wheels.txt"
KERNEL_TESTS = ("tests/kernels",)
# pytest node id -> why it cannot run on the GPU machine (a package absent there): passed to pytest as --deselect
# and listed in the report. Empty: every kernel test needs only torch, numpy, pytest and cryptography (a wheel).
DESELECT: dict[str, str] = {}
IMPORTS_ENV = "GPU_CHECK_IMPORTS"  # the pytest process of step 1 writes its third-party imports there
MODELS, QUICK_MODELS = ("gpt2", "qwen3-0.6b"), ("gpt2-mini", "qwen3-mini")
STEPS = ("tests", "shapes", "decode")


def normalise(name: str) -> str:
    """PEP 503 name of a distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> set[str]:
    """Distribution names of a list file (one a line, ``name`` or ``name==version``; ``#`` comments)."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {normalise(line.split("==")[0]) for line in lines if line}


def link_sources() -> Path:
    """A temporary folder linking this checkout's packages under their installed names, first on ``sys.path``
    (removed at exit: only the links go)."""
    from _report import link_packages

    folder = link_packages(ROOT, Path(tempfile.mkdtemp(prefix="gpu-check-")))
    atexit.register(shutil.rmtree, folder, True)
    sys.path.insert(0, str(folder))
    return folder


TEMP = Path(tempfile.gettempdir()).resolve()
_STDLIB = tuple(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib"))
_IMPORTED_BY: dict[str, str | None] = {}  # top-level module -> the file whose code first imported it


def _in_stdlib(path: str) -> bool:
    return path.startswith(_STDLIB) and "-packages" not in path


def _record_importer(event: str, args: tuple) -> None:
    """Audit hook: remember who first imports each top-level module (import machinery and stdlib frames skipped)."""
    if event != "import" or not args[0]:
        return
    top = args[0].partition(".")[0]
    if top in _IMPORTED_BY:
        return
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith("<") or _in_stdlib(frame.f_code.co_filename)):
        frame = frame.f_back
    _IMPORTED_BY[top] = frame.f_code.co_filename if frame is not None else None


def third_party_imports() -> dict[str, dict[str, list[str]]]:
    """{distribution: {"modules": top-level modules, "imported_by": their first importers}} of every loaded module
    that is neither the standard library nor this repository's code. A file belongs to the distribution owning its
    top folder (or file) under its ``sys.path`` entry, so extension modules that register top-level names count
    for their package; an importer is ``repo``, a distribution, or ``?`` (loaded before :func:`_record_importer`
    was installed). Modules without a file, or unclaimed in the temporary folder, are skipped; ``?name``: no
    installed distribution claims it."""
    owners = importlib.metadata.packages_distributions()
    roots = sorted({Path(p).resolve() for p in sys.path if p and Path(p).is_dir()}, key=lambda p: -len(p.parts))

    def owner(file: str | None, name: str) -> str | None:
        if not file or file in ("built-in", "frozen"):
            return None
        path = Path(file).resolve()
        if path.is_relative_to(ROOT) and not any(part.endswith("-packages") for part in path.parts):
            return "repo"  # (a virtual environment inside the checkout, as `make` makes, is not the repository)
        if _in_stdlib(str(path)):
            return None
        base = next((r for r in roots if path.is_relative_to(r)), None)
        key = path.relative_to(base).parts[0].split(".")[0] if base else name
        if owners.get(key):
            return normalise(owners[key][0])
        return None if path.is_relative_to(TEMP) else f"?{name}"  # None: written at run time (torch.distributed)

    out: dict[str, dict[str, set[str]]] = {}
    for name, module in list(sys.modules.items()):
        if "." in name or name.startswith("__") or name in sys.stdlib_module_names or module is None:
            continue
        spec = getattr(module, "__spec__", None)
        dist = owner(getattr(spec, "origin", None) or getattr(module, "__file__", None), name)
        if dist in (None, "repo"):
            continue
        entry = out.setdefault(dist, {"modules": set(), "imported_by": set()})
        entry["modules"].add(name)
        entry["imported_by"].add(owner(_IMPORTED_BY.get(name), name) or "?")
    return {d: {k: sorted(v) for k, v in e.items()} for d, e in sorted(out.items())}


def check_imports(loaded: dict[str, dict[str, list[str]]]) -> dict:
    """Sort the loaded distributions against the GPU machine: on its list, carried as a wheel, imported only by
    code of other distributions that are not ours (the machine's own dependencies: in the versions installed
    there they need not be the ones here), or ``not_on_device``: imported by this repository, by a wheel, or by
    an unknown importer, and neither listed nor carried."""
    device, wheels = listed(DEVICE_PACKAGES), listed(WHEELS)
    ours = {"repo", "?"} | wheels
    theirs = {d: e["imported_by"] for d, e in loaded.items() if d not in device | wheels}
    return {"third_party": loaded, "wheels": sorted(wheels & set(loaded)),
            "dependencies_of_installed": {d: by for d, by in theirs.items() if not ours & set(by)},
            "not_on_device": sorted(d for d, by in theirs.items() if ours & set(by))}


def pytest_sessionfinish(session, exitstatus):
    """pytest hook (step 1 loads this file with ``-p gpu_check``): write the test process's third-party imports."""
    path = os.environ.get(IMPORTS_ENV)
    if path:
        Path(path).write_text(json.dumps(third_party_imports()))


def _tail(text: str, chars: int = 4000) -> str:
    return text[-chars:]


def _guarded(fn, *args) -> dict:
    """``fn(*args)``, or ``{"error", "traceback"}`` when it raises: the other steps and models still run."""
    try:
        return fn(*args)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": _tail(traceback.format_exc())}


def kernel_tests(device: str, links: Path, timeout_s: float) -> dict:
    """Step 1: pytest over :data:`KERNEL_TESTS` with the kernels on ``device``; counts from its JUnit XML."""
    from bifrost_kernels.backend import DEVICE_ENV

    with tempfile.TemporaryDirectory() as tmp:
        junit, imports = Path(tmp) / "junit.xml", Path(tmp) / "imports.json"
        env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **{DEVICE_ENV: device, IMPORTS_ENV: str(imports)})
        env["PYTHONPATH"] = os.pathsep.join([str(links), str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])])
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check", f"--junitxml={junit}",
               *KERNEL_TESTS, *(f"--deselect={node}" for node in DESELECT)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        result = {"device": device, "command": " ".join(cmd[1:]), "exit_code": proc.returncode,
                  "seconds": time.perf_counter() - t0, "deselected": DESELECT}
        if not junit.exists():
            return {**result, "error": f"pytest wrote no report (exit {proc.returncode})",
                    "output_tail": _tail(proc.stdout + proc.stderr)}
        suites = ET.parse(junit).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        result.update(passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                      failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"], failing=failed)
        if proc.returncode != 0:
            result["output_tail"] = _tail(proc.stdout + proc.stderr)
        if imports.exists():
            result["imports"] = json.loads(imports.read_text())
        return result


def shape_benchmark(device: str, repeats: int, quick: bool) -> dict:
    """Step 2: ``kernels_bench`` per-shape rows (rows = 1) on ``device``, its Qwen3 groups and per-token projections."""
    import kernels_bench as kb

    from bifrost.ckks.registry import get_backend

    native = get_backend("native")
    ctx = native.keygen(native.default_params, [])
    ev = native.evaluator(ctx.public_context(), device=device)
    rows = kb.shape_rows(ctx, ev, repeats, kb.SHAPES[:1] if quick else kb.SHAPES)
    out = {"device": str(ev.device), "repeats": repeats, "weight_bits": ev.weight_bits, "shapes": rows}
    if not quick:
        by_shape = {r["shape"]: r for r in rows}
        out["qwen3_groups"] = kb.group_rows(ctx, ev, repeats)
        out["gpt2_124m_per_token_projected"] = kb.project([by_shape[f"{g.d_in}x{g.d_outs[0]}"] for g in kb.GPT2_LAYER],
                                                          kb.GPT2_LAYERS)
        out["qwen3_0.6b_per_token_projected"] = kb.project(out["qwen3_groups"], kb.QWEN3_LAYERS)
    return out


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


STAGES = (("_decode_inputs", "unpack_s"), ("_kernel", "kernel_s"), ("_encode_outputs", "pack_s"))


def time_stages(ev, seconds: dict[str, float]) -> None:
    """Wrap the evaluator's stages (:data:`STAGES`: check + unpack + upload; the kernel + download;
    pack) so each call adds its seconds to ``seconds``; ``apply`` is their sum plus a little bookkeeping."""
    for attr, key in STAGES:
        stage = getattr(ev, attr, None)
        if stage is None:  # renamed: the breakdown is left out, the totals stay
            continue
        seconds[key] = 0.0

        def timed(*args, _stage=stage, _key=key):
            t0 = time.perf_counter()
            try:
                return _stage(*args)
            finally:
                seconds[_key] += time.perf_counter() - t0

        setattr(ev, attr, timed)


def decode_token(name: str, device: str, tokens: int, seed: int = 0) -> dict:
    """Step 3 for one model: the worker's seconds and ciphertext bytes per decode token (module docstring)."""
    import numpy as np
    import torch
    from kernels_bench import activations

    from bifrost.ckks import GroupShape, WeightStats
    from bifrost.ckks.registry import get_backend
    from bifrost.config_loader import load_config, placement_of
    from bifrost.model.catalog import load_model, resolve
    from bifrost.model.delegation import fuse_groups, sites

    cfg = load_config()
    t0 = time.perf_counter()
    model = load_model(resolve(name), cfg.seed)
    weights = {s.name: w for s, w in sites(model, placement_of(cfg), name, check_requires=False)}  # the worker's view
    del model
    groups = fuse_groups(list(weights), cfg.delegation)
    load_s = time.perf_counter() - t0

    native = get_backend("native")
    ctx = native.keygen(native.default_params, [])
    ev = native.evaluator(ctx.public_context(), device=device)
    if ev.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ev.device)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    calls = []  # (shape, weights, prepared, one decode row of activations) per group, in the engine's order
    for g in groups:
        ws = [weights[n] for n in g]
        shape = GroupShape(ws[0].shape[1], tuple(w.shape[0] for w in ws))
        calls.append((shape, ws, ev.prepare(shape, ws), activations(rng, 1, shape.d_in)))
    _sync(device)
    prepare_s = time.perf_counter() - t0

    stage_s: dict[str, float] = {}
    time_stages(ev, stage_s)
    worker_s, encrypt_s, stages, last = [], [], [], []
    for token in range(tokens + 1):  # token 0 warms up (allocations, FFT plans): not counted
        worker = encrypt = 0.0
        up = down = 0
        last = []
        stage_s.update(dict.fromkeys(stage_s, 0.0))
        for shape, ws, prepared, x in calls:
            t0 = time.perf_counter()
            batch = ctx.encrypt(shape, x)
            t1 = time.perf_counter()
            out = ev.apply(prepared, batch.ciphertexts)  # returns bytes: the device work is done
            worker += time.perf_counter() - t1
            encrypt += t1 - t0
            up += sum(map(len, batch.ciphertexts))
            down += sum(len(c) for o in out for c in o)
            last.append((batch, out))
        if token:
            worker_s.append(worker)
            encrypt_s.append(encrypt)
            stages.append(dict(stage_s))

    worst = 0.0  # the last token's products, decrypted: error over the backend's worst-case bound
    for (shape, ws, _, x), (batch, out) in zip(calls, last):
        stats = [WeightStats.of(w) for w in ws]
        ys, eps = ctx.decrypt(shape, out, batch, stats), ctx.error_bound(shape, batch, stats)
        worst = max([worst] + [float((np.abs(y - x @ w.T) / eps[:, [m]]).max()) for m, (y, w) in enumerate(zip(ys, ws))])
    shapes = sorted({f"{s.d_in}x{'+'.join(map(str, s.d_outs))}" for s, *_ in calls})
    result = {
        "model": name, "device": str(ev.device), "groups_per_token": len(calls), "delegated_layers": len(weights),
        "group_shapes": shapes, "tokens_timed": tokens,
        "worker_s_per_token": statistics.median(worker_s), "best_worker_s_per_token": min(worker_s),
        "worker_stage_s_per_token": {k: statistics.median(s[k] for s in stages) for k in stage_s},
        "trusted_encrypt_s_per_token": statistics.median(encrypt_s),
        "bytes_up_per_token": up, "bytes_down_per_token": down,
        "max_error_over_error_bound": worst,
        "load_model_s": load_s, "prepare_s": prepare_s,
        "prepared_bytes": sum(p.nbytes for _, _, p, _ in calls),
    }
    if ev.device.type == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(ev.device)
    return result


def machine(device: str) -> dict:
    import numpy
    import torch

    info = {"requested_device": device, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        dev = torch.device(device)
        index = (dev.index or 0) if dev.type == "cuda" else 0
        props = torch.cuda.get_device_properties(index)
        info.update(gpu=torch.cuda.get_device_name(index), gpu_memory_bytes=props.total_memory,
                    gpu_capability=f"{props.major}.{props.minor}", gpu_multiprocessors=props.multi_processor_count)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def preflight(device: str) -> str | None:
    """One line saying why the check cannot run here (CUDA asked for but absent, a wheel not installed), or None."""
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return (f"--device {device} requested but CUDA is unavailable (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    missing = []
    for name in sorted(listed(WHEELS)):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        return (f"missing {', '.join(missing)}: run `bash benchmarks/gpu_wheels.sh` and carry .whl "
                "(benchmarks/gpu_check.sh installs it)")
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="where the worker's kernels run (cuda, cuda:1, cpu)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: one shape, models {' '.join(QUICK_MODELS)}, 2 tokens, 1 repeat")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--models", nargs="+", help=f"step 3's models (default {' '.join(MODELS)})")
    ap.add_argument("--tokens", type=int, help="decode tokens timed per model, after one warm-up (default 5)")
    ap.add_argument("--repeats", type=int, help="step 2's repeats per shape (default 5)")
    ap.add_argument("--tests-timeout", type=float, default=150.0, help="step 1's limit (seconds)")
    ap.add_argument("--out", default=str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None,
                    help="also write the JSON here (default $OUT/gpu_check.json when $OUT is set)")
    args = ap.parse_args(argv)
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    tokens = args.tokens or (2 if args.quick else 5)
    repeats = args.repeats or (1 if args.quick else 5)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (as kernels_bench)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.addaudithook(_record_importer)
    links = link_sources()
    why = preflight(args.device)
    if why:
        print(f"gpu_check: error: {why}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = {"machine": machine(args.device), "quick": args.quick, "steps": {}}
    m = report["machine"]
    print(f"gpu_check: device {args.device} ({m.get('gpu', 'no GPU')}), torch {m['torch']}, CUDA {m['torch_cuda']}, "
          f"Python {m['python']}", file=sys.stderr)

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{args.out}.tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(args.out)

    work = {"tests": lambda: kernel_tests(args.device, links, args.tests_timeout),
            "shapes": lambda: shape_benchmark(args.device, repeats, args.quick),
            "decode": lambda: {name: _guarded(decode_token, name, args.device, tokens) for name in models}}
    for step in STEPS:
        if step not in args.steps:
            continue
        print(f"gpu_check: step {step} ...", file=sys.stderr)
        t0 = time.perf_counter()
        report["steps"][step] = _guarded(work[step])
        report["steps"][step]["step_seconds"] = time.perf_counter() - t0
        print(f"gpu_check: step {step} done in {report['steps'][step]['step_seconds']:.1f} s", file=sys.stderr)
        save()

    imports = third_party_imports()
    for dist, entry in report["steps"].get("tests", {}).pop("imports", {}).items():
        mine = imports.setdefault(dist, {k: [] for k in entry})
        for k, v in entry.items():
            mine[k] = sorted(set(mine[k]) | set(v))
    report["imports"] = check_imports(imports)
    problems = [f"{step}: {r['error']}" for step, r in report["steps"].items() if "error" in r]
    problems += [f"decode {name}: {r['error']}" for name, r in report["steps"].get("decode", {}).items()
                 if isinstance(r, dict) and "error" in r]
    tests = report["steps"].get("tests", {})
    if tests.get("failed") or tests.get("errors"):
        problems.append(f"tests: {tests['failed']} failed, {tests['errors']} errors")
    for name, r in report["steps"].get("decode", {}).items():
        if isinstance(r, dict) and r.get("max_error_over_error_bound", 0) >= 1:
            problems.append(f"decode {name}: error {r['max_error_over_error_bound']:.3g} × its bound")
    for r in report["steps"].get("shapes", {}).get("shapes", []):
        if r["error_over_error_bound"] >= 1 or not r["verify_passed"]:
            problems.append(f"shapes {r['shape']}: error {r['error_over_error_bound']:.3g} × bound, "
                            f"verify {'passed' if r['verify_passed'] else 'FAILED'}")
    if report["imports"]["not_on_device"]:
        problems.append(f"imports absent on the GPU machine: {', '.join(report['imports']['not_on_device'])}")
    report.update(ok=not problems, problems=problems, total_seconds=time.perf_counter() - start)
    save()
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
elif os.environ.get(IMPORTS_ENV):  # loaded by step 1's pytest as a plugin, before any test module: record importers
    sys.addaudithook(_record_importer)
