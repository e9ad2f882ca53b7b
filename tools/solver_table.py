"""Solver accuracy against closed forms on Gaussian data (exact score): the solver table.

    python tools/solver_table.py [--out docs/solvers/solver_table.json]

For data ``x_0 ~ N(mu, s^2)`` per pixel the score is exact (tests/gaussian.py),
so the only error left is the solver's. For every solver x time grid x step
count (10, 20, 50), on VP and VE, from t0 = 0.5 down to eps:

* ODE error: max |x - flow(x_t0)| over a fixed set of starting points, where
  ``flow`` is the closed-form probability-flow map (deterministic solvers);
* variance ratio: the variance of SDEdit's output for a guide (40,000 pixels,
  one noise draw each) over its closed form: the reverse SDE's
  ``p(x_eps | x_t0)`` for stochastic solvers, the flow map's push-forward for
  deterministic ones (standard error of the ratio: 0.7 %).

Prints a markdown table and writes JSON. 332 s on the shared 2-core CPU (docs/solvers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gaussian import GaussianScore, sdedit_moments  # noqa: E402

import sdedit_jax as sj  # noqa: E402
from sdedit_jax import rng  # noqa: E402

MU, S, GUIDE, T0 = 0.3, 0.5, 0.9, 0.5
STEPS = (10, 20, 50)
SOLVERS = {  # name: (predictor, eta)
    "ddim eta=0": ("ddim", 0.0),
    "dpm_solver_2m": ("dpm_solver_2m", 0.0),
    "ode_heun (2 calls/step)": ("ode_heun", 0.0),
    "ddim eta=1": ("ddim", 1.0),
    "sde_dpm_solver_2m": ("sde_dpm_solver_2m", 0.0),
    "ancestral": ("ancestral", 0.0),
    "euler_maruyama": ("euler_maruyama", 0.0),
}
GRIDS = ("uniform", "logsnr", "karras")
SDES = {"VP": sj.VPSDE(), "VE": sj.VESDE(sigma_max=50.0)}


def _std(sde, t):
    t = jnp.asarray([t])
    return float(jnp.sqrt(jnp.exp(2 * sde.log_mean_coeff(t)) * S**2 + sde.marginal_var(t))[0])


def _alpha(sde, t):
    return float(jnp.exp(sde.log_mean_coeff(jnp.asarray([t])))[0])


def ode_error(sde, sampler) -> list[float]:
    """Max error of the solver's ODE map from t0 for each step count (one batch, traced steps)."""
    starts = np.linspace(-2.0, 2.0, 16, dtype=np.float32)
    x0 = _alpha(sde, T0) * MU + _std(sde, T0) * starts
    exact = _alpha(sde, sde.eps) * MU + _std(sde, sde.eps) * starts
    batch = len(STEPS)
    x = jnp.broadcast_to(jnp.asarray(x0)[None, :, None, None], (batch, 16, 1, 1))
    keys = rng.example_keys(jnp.zeros(batch, jnp.int32), jnp.zeros((batch, 2), jnp.uint32))
    run = jax.jit(sj.integrate, static_argnums=(0, 1, 2))
    out = run(
        sde,
        GaussianScore(sde, MU, S),
        sampler,
        keys,
        x,
        jnp.full((batch,), T0),
        jnp.full((batch,), sde.eps),
        jnp.asarray(STEPS, jnp.int32),
    )
    return [float(np.max(np.abs(np.asarray(out[i]).ravel() - exact))) for i in range(batch)]


def variance_ratio(sde, sampler) -> list[float]:
    """Output variance / closed form for each step count (40,000 pixels per count)."""
    batch, side = len(STEPS), 200
    guides = np.full((batch, side, side, 1), GUIDE, np.float32)
    out = np.asarray(
        sj.sdedit(
            GaussianScore(sde, MU, S),
            sde,
            guides,
            seed=11,
            t0=T0,
            n_steps=np.asarray(STEPS),
            predictor=sampler.predictor,
            eta=sampler.eta,
            time_grid=sampler.time_grid,
            max_steps=sampler.max_steps,
            denoise=False,
            per_device_batch=batch,
        )
    )
    if sampler.solver.stochastic:
        _, var = sdedit_moments(sde, MU, S, GUIDE, T0, sde.eps)
    else:  # push-forward of x_t0 ~ N(alpha_0 g, sigma_0^2) through the flow map
        sigma0 = float(sde.marginal_std(jnp.asarray([T0]))[0])
        var = (_std(sde, sde.eps) / _std(sde, T0) * sigma0) ** 2
    return [float(out[i].var() / var) for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/solvers/solver_table.json")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for sde_name, sde in SDES.items():
        for label, (predictor, eta) in SOLVERS.items():
            for grid in GRIDS:
                sampler = sj.Sampler(
                    predictor, max_steps=64, eta=eta, time_grid=grid, denoise=False
                )
                errors = ode_error(sde, sampler) if not sampler.solver.stochastic else None
                ratios = variance_ratio(sde, sampler)
                rows.append(
                    {
                        "sde": sde_name,
                        "solver": label,
                        "grid": grid,
                        "nfe_per_step": sampler.nfe_per_step,
                        "steps": list(STEPS),
                        "ode_error": errors,
                        "variance_ratio": ratios,
                    }
                )
    lines = [
        "| SDE | solver | grid | "
        + " | ".join(f"ODE err {n}" for n in STEPS)
        + " | "
        + " | ".join(f"var ratio {n}" for n in STEPS)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(STEPS)),
    ]
    for row in rows:
        errors = row["ode_error"] or [None] * len(STEPS)
        cells = ["-" if e is None else f"{e:.1e}" for e in errors]
        cells += [f"{r:.3f}" for r in row["variance_ratio"]]
        lines.append(
            f"| {row['sde']} | {row['solver']} | {row['grid']} | " + " | ".join(cells) + " |"
        )
    print("\n".join(lines))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "unknown",
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "mu": MU,
                "s": S,
                "guide": GUIDE,
                "t0": T0,
                "cpu": cpu,
                "rows": rows,
                "seconds": round(time.perf_counter() - started, 1),
            },
            f,
            indent=1,
        )
    print(
        f"\n{len(rows)} settings in {time.perf_counter() - started:.0f}s on {cpu}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
