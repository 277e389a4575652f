#!/usr/bin/env python3
"""Regenerate testdata/dp_accounting_reference.json from Google's dp-accounting.

Usage (from the crate root):
    python3 -m pip install --target .py dp-accounting
    PYTHONPATH=.py python3 tools/reference.py

For every case of the grid (q, sigma, steps) it records what
dp_accounting.rdp.RdpAccountant (default orders, ADD_OR_REMOVE_ONE) reports
for SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
-- or SelfComposedDpEvent(GaussianDpEvent(sigma), steps) when q == 1:

  * the full cumulative RDP vector at the default orders,
  * epsilon (and the optimal order) at delta = 1e-5,
  * delta at epsilon = 1.0,
  * for integer orders, the RDP computed independently with mpmath at 60
    significant digits (the exact binomial sum of Mironov et al. 2019, Sec. 3.3),
    so that a test can tell rounding noise in either float implementation from
    a real disagreement.

Repr of floats is exact (Python's repr round-trips), so the Rust side reads the
very same binary values.
"""

import importlib.metadata
import json
import math
import os
import sys

import mpmath
import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_mod

DELTA = 1e-5
EPSILON_FOR_DELTA = 1.0
QS = [1.0, 0.1, 0.01, 0.001]
SIGMAS = [0.5, 1.0, 2.0, 5.0]
STEPS = [1, 10, 100, 1000]


def exact_rdp_int(q: float, sigma: float, alpha: int) -> str:
    """RDP of one sampled-Gaussian step at integer alpha, 60 digits, as text."""
    mpmath.mp.dps = 60
    q_m = mpmath.mpf(q)
    s_m = mpmath.mpf(sigma)
    if q == 1.0:
        val = mpmath.mpf(alpha) / (2 * s_m**2)
        return mpmath.nstr(val, 40)
    total = mpmath.mpf(0)
    for i in range(alpha + 1):
        total += (
            mpmath.binomial(alpha, i)
            * q_m**i
            * (1 - q_m) ** (alpha - i)
            * mpmath.exp(mpmath.mpf(i * i - i) / (2 * s_m**2))
        )
    return mpmath.nstr(mpmath.log(total) / (alpha - 1), 40)


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    out_path = os.path.join(here, os.pardir, "testdata", "dp_accounting_reference.json")
    orders = [float(o) for o in rdp_mod.DEFAULT_RDP_ORDERS]
    exact_cache = {}
    cases = []
    for q in QS:
        for sigma in SIGMAS:
            for steps in STEPS:
                acc = rdp_mod.RdpAccountant()
                if q == 1.0:
                    ev = dp_event.GaussianDpEvent(sigma)
                else:
                    ev = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
                acc.compose(dp_event.SelfComposedDpEvent(ev, steps))
                eps, opt_order = acc.get_epsilon_and_optimal_order(DELTA)
                delta, delta_order = acc.get_delta_and_optimal_order(EPSILON_FOR_DELTA)
                rdp = [float(r) for r in acc.rdp]
                key = (q, sigma)
                if key not in exact_cache:
                    exact_cache[key] = {
                        str(int(o)): exact_rdp_int(q, sigma, int(o))
                        for o in orders
                        if float(o).is_integer()
                    }
                cases.append(
                    {
                        "q": q,
                        "sigma": sigma,
                        "steps": steps,
                        "epsilon": float(eps),
                        "epsilon_order": float(opt_order),
                        "delta_at_epsilon": float(delta),
                        "delta_order": float(delta_order),
                        # JSON has no Infinity; orders whose series did not
                        # converge in dp-accounting are written as null.
                        "rdp": [r if math.isfinite(r) else None for r in rdp],
                        "exact_rdp_one_step_integer_orders": exact_cache[key],
                    }
                )
    doc = {
        "generator": "tools/reference.py",
        "dp_accounting_version": importlib.metadata.version("dp-accounting"),
        "scipy_version": importlib.metadata.version("scipy"),
        "numpy_version": np.__version__,
        "mpmath_version": mpmath.__version__,
        "python_version": sys.version.split()[0],
        "neighboring_relation": "ADD_OR_REMOVE_ONE",
        "delta": DELTA,
        "epsilon_for_delta": EPSILON_FOR_DELTA,
        "orders": orders,
        "cases": cases,
    }
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {os.path.normpath(out_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
