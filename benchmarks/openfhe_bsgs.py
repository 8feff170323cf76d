"""OpenFHE baseline: plaintext-weight × CKKS-ciphertext product y = W x by the diagonal method with
baby-step/giant-step (BSGS) and hoisted rotations — not a test.

Runs under its own Python 3.10/3.12 venv (openfhe-python ships no CPython 3.11 wheel); imports only
``openfhe``, ``numpy`` and the standard library. ``make bench-kernels`` creates the venv
(``benchmarks/.venv-openfhe``) and ``kernels_bench.py`` runs this script in the same benchmark run.

    benchmarks/.venv-openfhe/bin/python benchmarks/openfhe_bsgs.py [--shapes 768x768 ...] [--repeats 5]

Shapes are ``IN``x``OUT`` (as in ``kernels_bench.py``): W is OUT×IN, x has IN entries. A non-square W is
zero-padded to d×d, d = max(IN, OUT).

Scheme: CKKS (RNS), HEStd_128_classic (OpenFHE refuses ring dimensions below the HE standard's for its
log QP), multiplicative depth 1, first prime 55 bits, scale 2^40, FIXEDMANUAL rescaling (one rescale at
the end, before the result is returned), HYBRID key switching; ring dimension: the smallest OpenFHE
accepts (N = 8192 here; a 60-bit first prime would force 16384). Slots: S = N/2. The input slot vector
is x replicated cyclically (period d) over all S slots, so a left rotation by r reads x[(j + r) mod d]
wherever j + r < S.

Layout ("packed", the default): the d generalised diagonals are split over p blocks (a power of two) of
c = ceil(d/p) diagonals; block t occupies slots [t·B, t·B + d) with stride B = d + c ≡ c (mod d), so in
block t the input rotated by i' reads diagonal t·c + i'. One plaintext multiply then covers p diagonals;
p·(d + c) ≤ S + 1 keeps the highest slot read below S (no wrap-around). Per product: c plaintext
multiplies, n1 − 1 hoisted baby-step rotations of x, n2 − 1 giant-step rotations (n1·n2 ≥ c; diagonals
pre-rotated by −g·n1 as usual), log2(p) rotations to add the blocks, one rescale. p and n1 minimise
``OP_COST_MS`` (relative costs measured on the 2-core dev box; 768×768 gets p = 4, n1 = 16, n2 = 12).
``--layouts plain`` forces p = 1 (textbook hoisted BSGS: d multiplies); ``--layouts packed plain`` runs both.

Plaintext diagonals are encoded once before timing (as a worker would cache them at load). Timings are
medians over ``--repeats`` after one warm-up. Prints one JSON document; exits 1 if any product's max
abs error vs numpy float64 exceeds the bound ``2^-20 · Σ|x| · max|W|`` (the scale is 2^40).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

# Passive OpenMP waiting (read when libgomp loads): on a shared, oversubscribed CPU, busy-waiting OpenFHE
# threads made single ops 100-250× slower in our measurements.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SCALE_BITS = 40
FIRST_MOD_BITS = 55
# Median ms per op, OpenFHE 1.6.1, N = 8192, 2 towers, one thread, OMP_WAIT_POLICY=PASSIVE (dev box).
OP_COST_MS = {"multiply": 0.11, "add": 0.05, "hoist": 1.0, "hoisted_rotation": 1.4, "rotation": 2.5}
ERROR_BOUND_BITS = 20  # bound = 2^-20 · Σ|x| · max|W|; CKKS at scale 2^40 is ~2^-30 relative or better here


def parse_shape(text: str) -> tuple[int, int]:
    """``"768x2304"`` -> (d_in, d_out); both positive."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) <= 0:
        raise argparse.ArgumentTypeError(f"shape must be INxOUT with positive integers, got {text!r}")
    return int(parts[0]), int(parts[1])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def ring_dim(text: str) -> int:
    value = positive_int(text)
    if value < 1024 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"ring dimension must be a power of two >= 1024, got {text!r}")
    return value


def plan_cost(c: int, n1: int, p: int) -> float:
    """Estimated product time (ms, ``OP_COST_MS``) for c diagonals per block, n1 baby steps, p blocks."""
    n2 = -(-c // n1)
    k = OP_COST_MS
    return (c * (k["multiply"] + k["add"]) + (n1 > 1) * k["hoist"] + (n1 - 1) * k["hoisted_rotation"]
            + (n2 - 1 + p.bit_length() - 1) * k["rotation"])


def choose_plan(d: int, slots: int, layout: str, baby_steps: int | None) -> tuple[int, int] | None:
    """(p, n1) of least ``plan_cost`` with p·(d + ceil(d/p)) ≤ slots + 1; None if even p = 1 misfits."""
    best = None
    p = 1
    while p <= (1 if layout == "plain" else d) and p * (d + -(-d // p)) <= slots + 1:
        c = -(-d // p)
        for n1 in ([min(baby_steps, c)] if baby_steps else range(1, c + 1)):
            cost = plan_cost(c, n1, p)
            if best is None or cost < best[0]:
                best = (cost, p, n1)
        p *= 2
    return best[1:] if best else None


class Plan:
    """Slot layout of one d×d product (see the module docstring). Pure numpy; no OpenFHE objects."""

    def __init__(self, d_in: int, d_out: int, slots: int, layout: str, baby_steps: int | None):
        self.d_in, self.d_out, self.slots = d_in, d_out, slots
        self.d = max(d_in, d_out)
        chosen = choose_plan(self.d, slots, layout, baby_steps)
        if chosen is None:
            raise ValueError(f"shape {d_in}x{d_out} needs {2 * self.d - 1} slots, ring dimension {2 * slots} has "
                             f"{slots}; use --ring-dim {1 << (4 * self.d - 3).bit_length()}")
        self.p, self.n1 = chosen
        self.c = -(-self.d // self.p)
        self.stride = self.d + self.c if self.p > 1 else 0
        self.n2 = -(-self.c // self.n1)
        self.block_shifts = [t * self.stride for t in (self.p >> k for k in range(1, self.p.bit_length()))]

    def rotation_indices(self) -> list[int]:
        idx = set(range(1, self.n1)) | {g * self.n1 for g in range(1, self.n2)}
        idx |= set(self.block_shifts)
        return sorted(idx)

    def input_slots(self, x):
        import numpy as np

        xp = np.zeros(self.d)
        xp[: self.d_in] = x
        return np.resize(xp, self.slots)  # cyclic replication, period d

    def diagonals(self, w):
        """Pre-rotated plaintext vectors: {(g, b): slot vector} for the BSGS sum (zero ones dropped)."""
        import numpy as np

        d, slots = self.d, self.slots
        wp = np.zeros((d, d))
        wp[: self.d_out, : self.d_in] = w
        rows = np.arange(d)
        out = {}
        for g in range(self.n2):
            for b in range(self.n1):
                i1 = g * self.n1 + b
                if i1 >= self.c:
                    continue
                vec = np.zeros(slots)
                for t in range(self.p):
                    i = t * self.c + i1
                    if i >= d:
                        continue
                    vec[t * self.stride + rows] = wp[rows, (rows + i) % d]
                if vec.any():
                    out[(g, b)] = np.roll(vec, g * self.n1)
        return out


def crypto_context(openfhe, args):
    """CKKS context at 128-bit classic security; ring dimension ``args.ring_dim`` or (0) OpenFHE's smallest."""
    params = openfhe.CCParamsCKKSRNS()
    params.SetSecurityLevel(openfhe.HEStd_128_classic)
    if args.ring_dim:
        params.SetRingDim(args.ring_dim)
    params.SetMultiplicativeDepth(1)
    params.SetFirstModSize(args.first_mod_bits)
    params.SetScalingModSize(SCALE_BITS)
    params.SetScalingTechnique(openfhe.FIXEDMANUAL)
    params.SetKeySwitchTechnique(openfhe.HYBRID)
    cc = openfhe.GenCryptoContext(params)  # raises if the ring dimension is below the HE standard's for log QP
    for feature in (openfhe.PKE, openfhe.KEYSWITCH, openfhe.LEVELEDSHE, openfhe.ADVANCEDSHE):
        cc.Enable(feature)
    return cc


def bsgs_product(cc, plan: Plan, pts: dict, ct):
    """y = W x on ciphertext ``ct`` (slots as in ``Plan.input_slots``); result rescaled, y in slots [0, d_out)."""
    m = cc.GetCyclotomicOrder()
    digits = cc.EvalFastRotationPrecompute(ct) if plan.n1 > 1 else None  # the hoisted part, shared by all n1
    baby = [ct] + [cc.EvalFastRotation(ct, b, m, digits) for b in range(1, plan.n1)]
    acc = None
    for g in range(plan.n2):
        terms = [cc.EvalMult(baby[b], pts[(g, b)]) for b in range(plan.n1) if (g, b) in pts]
        if not terms:
            continue
        inner = cc.EvalAddMany(terms) if len(terms) > 1 else terms[0]
        if g:
            inner = cc.EvalRotate(inner, g * plan.n1)
        acc = inner if acc is None else cc.EvalAdd(acc, inner)
    for shift in plan.block_shifts:  # p/2·B, p/4·B, ..., B: slots [0, d) end up holding the sum of all blocks
        acc = cc.EvalAdd(acc, cc.EvalRotate(acc, shift))
    return cc.Rescale(acc)


def median_time(fn, repeats: int):
    """(median s, best s, all times, last result) of ``repeats`` calls after one warm-up call."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), times, result


def activations(rng, d_in: int):
    """Same distribution as kernels_bench.py: N(0, 1) with three GPT-2-like outliers in [150, 400]."""
    x = rng.normal(0, 1, d_in)
    x[rng.choice(d_in, min(3, d_in), replace=False)] = rng.uniform(150, 400, min(3, d_in))
    return x


def measure(openfhe, np, cc, d_in: int, d_out: int, layout: str, args) -> dict:
    plan = Plan(d_in, d_out, cc.GetRingDimension() // 2, layout, args.baby_steps)
    t = time.perf_counter()
    cc.ClearEvalAutomorphismKeys()
    keys = cc.KeyGen()
    cc.EvalRotateKeyGen(keys.secretKey, plan.rotation_indices())
    keygen_s = time.perf_counter() - t
    rng = np.random.default_rng(args.seed)
    w = rng.normal(0, 0.05, (d_out, d_in))
    x = activations(rng, d_in)

    t = time.perf_counter()
    pts = {k: cc.MakeCKKSPackedPlaintext(v) for k, v in plan.diagonals(w).items()}
    encode_weights_s = time.perf_counter() - t

    def encrypt():
        return cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(plan.input_slots(x)))

    def decrypt(ct):
        pt = cc.Decrypt(keys.secretKey, ct)
        pt.SetLength(d_out)
        return np.asarray(pt.GetRealPackedValue()[:d_out])

    enc_s, enc_best, _, ct_x = median_time(encrypt, args.repeats)
    prod_s, prod_best, prod_times, ct_y = median_time(lambda: bsgs_product(cc, plan, pts, ct_x), args.repeats)
    dec_s, dec_best, _, y = median_time(lambda: decrypt(ct_y), args.repeats)

    err = float(np.abs(y - w @ x).max())
    bound = 2.0 ** -ERROR_BOUND_BITS * float(np.abs(x).sum()) * float(np.abs(w).max())
    return {
        "shape": f"{d_in}x{d_out}", "layout": layout,
        "product_s": prod_s, "best_product_s": prod_best, "product_times_s": prod_times,
        "encrypt_s": enc_s, "best_encrypt_s": enc_best, "decrypt_s": dec_s, "best_decrypt_s": dec_best,
        "keygen_s": keygen_s, "encode_weights_s": encode_weights_s,
        "bytes_sent": len(openfhe.Serialize(ct_x, openfhe.BINARY)),
        "bytes_received": len(openfhe.Serialize(ct_y, openfhe.BINARY)),
        "rotation_keys_bytes": len(openfhe.SerializeEvalAutomorphismKeyString(openfhe.BINARY, "")),
        "ciphertexts_in": 1, "ciphertexts_out": 1,
        "blocks": plan.p, "diagonals_per_block": plan.c, "baby_steps": plan.n1, "giant_steps": plan.n2,
        "plaintext_multiplies": len(pts), "hoisted_rotations": plan.n1 - 1,
        "giant_rotations": sum(1 for g in range(1, plan.n2) if any((g, b) in pts for b in range(plan.n1))),
        "block_rotations": len(plan.block_shifts),
        "max_abs_error": err, "error_bound": bound, "within_bound": err <= bound,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[(768, 768)], metavar="INxOUT")
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--ring-dim", type=ring_dim, default=0, help="N (default: the smallest OpenFHE accepts)")
    ap.add_argument("--first-mod-bits", type=positive_int, default=FIRST_MOD_BITS)
    ap.add_argument("--layouts", nargs="+", choices=("packed", "plain"), default=["packed"])
    ap.add_argument("--baby-steps", type=positive_int, default=None, help="n1 (default: least modelled cost)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import numpy as np
        import openfhe
    except ImportError as exc:
        print(f"openfhe_bsgs: cannot import openfhe/numpy under {sys.executable} ({exc}); use a Python 3.10/3.12 "
              f"venv with `pip install -r benchmarks/openfhe-requirements.txt` (make bench-kernels does this)",
              file=sys.stderr)
        return 2
    from importlib.metadata import version

    try:
        cc = crypto_context(openfhe, args)
    except RuntimeError as exc:  # e.g. a ring dimension below the HE standard's for this modulus
        ap.error(str(exc).rsplit("():", 1)[-1].strip())
    runs = [(d_in, d_out, layout) for d_in, d_out in args.shapes for layout in args.layouts]
    for d_in, d_out, layout in runs:  # reject misfits before the slow key generation
        try:
            Plan(d_in, d_out, cc.GetRingDimension() // 2, layout, args.baby_steps)
        except ValueError as exc:
            ap.error(str(exc))
    report = {
        "library": "openfhe", "openfhe_version": version("openfhe"), "python": platform.python_version(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "load_average_1min_at_start": os.getloadavg()[0]},
        "params": {"scheme": "CKKS", "security": "HEStd_128_classic", "ring_dim": cc.GetRingDimension(),
                   "slots": cc.GetRingDimension() // 2, "log2_q": round(math.log2(float(cc.GetModulus())), 1),
                   "multiplicative_depth": 1, "first_mod_bits": args.first_mod_bits, "scale_bits": SCALE_BITS,
                   "scaling": "FIXEDMANUAL", "key_switching": "HYBRID", "repeats": args.repeats,
                   "error_bound": f"2^-{ERROR_BOUND_BITS} * sum|x| * max|W|"},
        "results": [measure(openfhe, np, cc, *run, args) for run in runs],
    }
    print(json.dumps(report, indent=2))
    bad = [r["shape"] for r in report["results"] if not r["within_bound"]]
    if bad:
        print(f"openfhe_bsgs: error above bound for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
