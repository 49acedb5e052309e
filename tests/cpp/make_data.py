"""Write tests/cpp/data/common_cases.txt, the expected values of the torch-free C++ tests (tests/cpp).

    python tests/cpp/make_data.py tests/cpp/data/common_cases.txt

tests/test_cpp_data.py regenerates the file and requires it to equal the checked-in one byte for
byte, so a change to the Python samplers or the Philox oracle that moves a value shows up there
(rerun this script and commit the file). The output is deterministic: fixed inputs, no random state, and torch's
CPU kernels pinned to their portable build (ATEN_CPU_CAPABILITY=default, set below before torch
loads): the vectorized ones round differently (the schedule's float32 torch.linspace differs in
the last bit between the default build and the AVX2/AVX512 ones), which would make the file depend
on the machine that writes it.

One record per line, the first word saying what it is; ``#`` starts a comment line. Floats are
written with ``repr`` (the shortest string that reads back as the same float64, ``nan``/``inf``
included), so the C++ side parses them exactly with strtod.

- ``columns``: the coefficient table's column names, in fastdiff's order (``STEP_COEFS``).
- ``philox SEED STEP IMAGE INDEX W0 W1 W2 W3 Z0 Z1 Z2 Z3``: the Philox words (hex) of the block that
  holds element INDEX of image IMAGE at sampler step STEP, from ``fastdiff.reference.philox``'s
  ``philox4x32_10`` on the counter (INDEX // 4, IMAGE, STEP, 0) and key (low, high word of SEED), and
  that block's four normals from its ``philox_normal`` (float64 Box-Muller), rounded to float32: the
  C++ normals are float32, and the rounding keeps the file the same where numpy's float64 log/cos/sin
  differ in the last bit between CPUs (a float64 ulp moves a float32 rounding with odds of ~2^-29).
- ``row ID LABEL SAMPLER PREDICTION VARIANCE ETA LEARNED STEP TIMESTEP ALPHA_T ALPHA_PREV C0 .. C11``:
  row STEP of the float64 coefficient table that ``fastdiff.sampling.make_sampler`` builds (6 steps of
  the 1000-step linear schedule), with the sampler's alphas_cumprod at the step's timestep and where
  it moves to; VARIANCE is ``none`` where the sampler has no variance option; LEARNED (0/1) is the
  sampler's ``learned_sigma``.
- ``case ROW LEARNED HAS_HIST HAS_NOISE X M VAR H Z CLIP_LO CLIP_HI X0_SCALE ADDS_HIST ADDS_NOISE X0
  PREV``: one element of the fused step on coefficient row ROW: the inputs (as
  ``fastdiff::sampler_step_value`` takes them), whether the step adds the history and the noise
  term, and the expected x0 and x_prev, computed below in plain Python float64 from the formulas
  (not by running the C++).
- ``end NPHILOX NROWS NCASES``: the counts, so that a truncated file fails to parse.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

if "torch" not in sys.modules:
    os.environ["ATEN_CPU_CAPABILITY"] = "default"  # see the docstring; read once, when torch loads

import numpy as np  # noqa: E402 (after the environment is set)
import torch  # noqa: E402

from fastdiff import Schedule  # noqa: E402
from fastdiff.reference.philox import philox4x32_10, philox_normal  # noqa: E402
from fastdiff.reference.sampler_step import STEP_COEFS  # noqa: E402
from fastdiff.sampling import make_sampler  # noqa: E402

STEPS = 6  # of the 1000-step linear schedule
PREDICTIONS = ("eps", "v", "x0")
# (label, sampler, keyword arguments): every sampler kind whose rows the fused step runs.
SAMPLERS = (
    ("ddim_eta0", "ddim", {"eta": 0.0}),
    ("ddim_eta1", "ddim", {"eta": 1.0}),
    ("ddpm_small", "ddpm", {"variance": "fixed_small"}),
    ("ddpm_large", "ddpm", {"variance": "fixed_large"}),
    ("ddpm_learned", "ddpm", {"variance": "learned_range"}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", {}),
)
CASE_STEPS = (0, 2, STEPS - 1)  # the rows that get per-element cases: first, a middle (second-order) one, last

# (seed, step, image, index): seeds with both key words nonzero, images and steps past 2^31, indices in
# each position of their block.
PHILOX = (
    (0, 0, 0, 0),
    (1, 0, 0, 5),
    (2**32 + 7, 3, 1, 11),
    (2**64 - 1, 9, 2, 1000),
    (0x0123456789ABCDEF, 2**31 + 5, 5, 4 * 4660 + 2),
    (12345, 999, 2**31 + 3, 4097),
    (0xDEADBEEF00000000, 4294967295, 4294967295, 63),
    (2**63, 17, 123456, 32767),
)

INF = math.inf
NAN = math.nan


def f(v: float) -> str:
    return repr(float(v))


def philox_lines() -> list[str]:
    lines = []
    for seed, step, image, index in PHILOX:
        block = index // 4
        words = philox4x32_10(np.array([[block, image, step, 0]], dtype=np.uint64), (seed & 0xFFFFFFFF, seed >> 32))
        normals = philox_normal(seed, step, 1, 4 * (block + 1), first=image)[0, 4 * block :].tolist()
        z32 = [float(np.float32(z)) for z in normals]
        lines.append(
            f"philox {seed} {step} {image} {index} "
            + " ".join(f"{int(w):08x}" for w in words[0])
            + " "
            + " ".join(f(z) for z in z32)
        )
    return lines


def sampler_rows() -> list[dict]:
    schedule = Schedule("linear", 1000)
    rows = []
    for label, name, kwargs in SAMPLERS:
        for prediction in PREDICTIONS:
            sampler = make_sampler(name, schedule, STEPS, prediction=prediction, dtype=torch.float64, **kwargs)
            table = sampler.coefs
            assert table.dtype == torch.float64 and tuple(table.shape) == (STEPS, len(STEP_COEFS))
            for step in range(STEPS):
                rows.append(
                    {
                        "id": len(rows),
                        "label": label,
                        "sampler": name,
                        "prediction": prediction,
                        "variance": sampler.variance or "none",
                        "eta": float(kwargs.get("eta", 0.0)),
                        "learned": bool(sampler.learned_sigma),
                        "step": step,
                        "timestep": int(sampler.timesteps[step]),
                        "alpha_t": float(sampler.alpha_t[step]),
                        "alpha_prev": float(sampler.alpha_prev[step]),
                        "coefs": dict(zip(STEP_COEFS, table[step].tolist(), strict=True)),
                    }
                )
    return rows


def row_line(row: dict) -> str:
    head = (
        f"row {row['id']} {row['label']} {row['sampler']} {row['prediction']} {row['variance']} {f(row['eta'])} "
        f"{int(row['learned'])} {row['step']} {row['timestep']} {f(row['alpha_t'])} {f(row['alpha_prev'])}"
    )
    return head + " " + " ".join(f(row["coefs"][name]) for name in STEP_COEFS)


def expected_step(k: dict, learned, has_hist, has_noise, x, m, var, h, z, clip, threshold):
    """(adds_hist, adds_noise, x0, prev) from the math, in float64.

    x0 = a_x x + a_m m (the prediction turned into x0), clipped to [-clip, clip], or, with dynamic
    thresholding (Saharia et al. 2022), clamped to [-s, s] and divided by s; eps = e_x x + e_m m;
    prev = c_x0 x0 + c_eps eps + c_x x, plus c_hist h where a history is given and the row weighs it,
    plus sigma z where noise is drawn and (with a learned variance) the row's noise factor is not 0.
    The learned sigma is the square root of Nichol & Dhariwal's (2021, eq. 15) variance
    exp(f log beta + (1 - f) log beta_tilde), f = (v + 1) / 2, times the noise factor. NaN stays NaN
    through the clamp (min/max would turn it into a bound).
    """
    x0 = k["a_x"] * x + k["a_m"] * m
    if not math.isnan(x0):
        if threshold is not None:
            x0 = min(max(x0, -threshold), threshold) / threshold
        elif clip is not None:
            x0 = min(max(x0, -clip), clip)
    eps = k["e_x"] * x + k["e_m"] * m
    prev = k["c_x0"] * x0 + k["c_eps"] * eps + k["c_x"] * x
    adds_hist = has_hist and k["c_hist"] != 0
    if adds_hist:
        prev += k["c_hist"] * h
    adds_noise = has_noise and (not learned or k["noise"] != 0)
    if adds_noise:
        if learned:
            frac = (var + 1) / 2
            sigma = math.sqrt(math.exp(frac * k["log_large"] + (1 - frac) * k["log_small"])) * k["noise"]
        else:
            sigma = k["sigma"]
        prev += sigma * z
    return adds_hist, adds_noise, x0, prev


def cases_for(row: dict) -> list[str]:
    """The per-element cases of one row: plain, noise, clipping and thresholding (inside and past
    the bound), history on (weighed or not), learned variance at its ends, NaN prediction, and
    NaN/Inf in inputs the step must not read."""
    learned = row["learned"]
    k = row["coefs"]
    # (has_hist, has_noise, x, m, var, h, z, clip, threshold)
    specs = [
        (False, False, 0.7, -0.4, 0.0, 0.0, 0.0, None, None),
        (False, True, -1.1, 0.35, 0.25, 0.0, 1.3, None, None),
        (False, True, 0.45, 1.9, -1.0, 0.0, -0.8, None, None),  # learned: f = 0, beta_tilde's end
        (False, True, -0.2, -2.1, 1.0, 0.0, 2.2, None, None),  # learned: f = 1, beta's end
        (False, False, 1.5, -0.2, 0.0, 0.0, 0.0, 1.0, None),  # clipping
        (False, False, 0.03, 0.02, 0.0, 0.0, 0.0, 1.0, None),
        (False, True, -1.6, 0.9, 0.5, 0.0, -0.6, None, 1.7),  # dynamic thresholding
        (False, True, 0.05, -0.07, 0.5, 0.0, 0.4, None, 1.7),
        (True, False, 0.6, -0.5, 0.0, 0.9, 0.0, None, None),  # history
        (True, True, -0.3, 0.8, -0.5, -1.2, 0.7, 1.0, None),
        (True, False, 0.6, -0.5, 0.0, NAN, 0.0, None, None),  # NaN history: NaN where the row weighs it
        (False, False, 0.6, NAN, 0.0, 0.0, 0.0, 1.0, None),  # NaN prediction through the clamp
        (False, True, 0.6, NAN, 0.0, 0.0, 0.5, None, 1.7),
        (False, False, 0.6, -0.5, NAN, NAN, NAN, None, None),  # no noise, no history: NaN inputs unread
        (False, True, 0.6, -0.5, INF, 0.0, NAN, None, None),  # learned last step: noise factor 0, unread
    ]
    lines = []
    for has_hist, has_noise, x, m, var, h, z, clip, threshold in specs:
        pre = k["a_x"] * x + k["a_m"] * m
        for bound in (clip, threshold):
            # A clamp decided within rounding of the bound could go the other way in float32.
            assert bound is None or math.isnan(pre) or abs(abs(pre) - bound) > 1e-3 * bound, (row, x, m)
        adds_hist, adds_noise, x0, prev = expected_step(
            k, learned, has_hist, has_noise, x, m, var, h, z, clip, threshold
        )
        if threshold is not None:
            lo, hi, scale = -threshold, threshold, 1 / threshold
        elif clip is not None:
            lo, hi, scale = -clip, clip, 1.0
        else:
            lo, hi, scale = -INF, INF, 1.0
        fields = [row["id"], int(learned), int(has_hist), int(has_noise)]
        fields += [f(v) for v in (x, m, var, h, z, lo, hi, scale)]
        fields += [int(adds_hist), int(adds_noise), f(x0), f(prev)]
        lines.append("case " + " ".join(str(v) for v in fields))
    return lines


def render() -> str:
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        raise RuntimeError(
            "run tests/cpp/make_data.py as a script: it loads torch with ATEN_CPU_CAPABILITY=default "
            f"(this process has {torch.backends.cpu.get_cpu_capability()})"
        )
    philox = philox_lines()
    rows = sampler_rows()
    cases = [line for row in rows if row["step"] in CASE_STEPS for line in cases_for(row)]
    out = [
        "# Expected values of the C++ tests in tests/cpp: generated by tests/cpp/make_data.py (its docstring",
        "# describes the records); do not edit by hand. tests/test_cpp_data.py checks that it is current.",
        "columns " + " ".join(STEP_COEFS),
        "# philox SEED STEP IMAGE INDEX W0 W1 W2 W3 Z0 Z1 Z2 Z3",
        *philox,
        "# row ID LABEL SAMPLER PREDICTION VARIANCE ETA LEARNED STEP TIMESTEP ALPHA_T ALPHA_PREV "
        + " ".join(STEP_COEFS),
        *(row_line(row) for row in rows),
        "# case ROW LEARNED HAS_HIST HAS_NOISE X M VAR H Z CLIP_LO CLIP_HI X0_SCALE ADDS_HIST ADDS_NOISE X0 PREV",
        *cases,
        f"end {len(philox)} {len(rows)} {len(cases)}",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/cpp/make_data.py OUTPUT", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(render(), encoding="ascii", newline="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
