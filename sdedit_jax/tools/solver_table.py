"""Solver accuracy against closed forms on Gaussian data (exact score): the solver table.

    python -m sdedit_jax.tools.solver_table [--out docs/solvers/solver_table.json]
        [--solvers=sde_dpm_solver_2m,sde_dpm_solver_3m] [--steps=5,10,20]

For data ``x_0 ~ N(mu, s^2)`` per pixel the score is exact (``gaussian_reference``),
so the only error left is the solver's. For every solver x time grid x step
count (10, 20, 50 unless ``--steps``), on VP and VE, from t0 = 0.5 down to eps:

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
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sdedit_jax as sj
from sdedit_jax import rng
from sdedit_jax.sde import SDE
from sdedit_jax.tools.gaussian_reference import GaussianScore, data_marginal, sdedit_moments
from sdedit_jax.tools.timing import cpu_model_name

MU, S, GUIDE, T0 = 0.3, 0.5, 0.9, 0.5
STEPS = (10, 20, 50)
SOLVERS = {  # name: (predictor, eta)
    "ddim eta=0": ("ddim", 0.0),
    "dpm_solver_2m": ("dpm_solver_2m", 0.0),
    "ode_heun (2 calls/step)": ("ode_heun", 0.0),
    "ddim eta=1": ("ddim", 1.0),
    "sde_dpm_solver_2m": ("sde_dpm_solver_2m", 0.0),
    "sde_dpm_solver_3m": ("sde_dpm_solver_3m", 0.0),
    "ancestral": ("ancestral", 0.0),
    "euler_maruyama": ("euler_maruyama", 0.0),
}
GRIDS = ("uniform", "logsnr", "karras")
SDES = {"VP": sj.VPSDE(), "VE": sj.VESDE(sigma_max=50.0)}


def ode_errors(
    sde: SDE, sampler: sj.Sampler, mu: float, s: float, t0: float, steps: Sequence[int]
) -> list[float]:
    """Max error of a deterministic solver's map from ``t0`` to eps against the exact flow.

    16 starting points spread over +-2 standard deviations of ``p_t0``, one example
    per step count, all in one traced batch.
    """
    starts = np.linspace(-2.0, 2.0, 16, dtype=np.float32)
    (mean_0, std_0), (mean_e, std_e) = (data_marginal(sde, mu, s, t) for t in (t0, sde.eps))
    x0 = mean_0 + std_0 * starts
    exact = mean_e + std_e * starts
    batch = len(steps)
    x = jnp.broadcast_to(jnp.asarray(x0)[None, :, None, None], (batch, 16, 1, 1))
    keys = rng.example_keys(jnp.zeros(batch, jnp.int32), jnp.zeros((batch, 2), jnp.uint32))
    run = jax.jit(sj.integrate, static_argnums=(0, 1, 2))
    out = run(
        sde,
        GaussianScore(sde, mu, s),
        sampler,
        keys,
        x,
        jnp.full((batch,), t0),
        jnp.full((batch,), sde.eps),
        jnp.asarray(steps, jnp.int32),
    )
    return [float(np.max(np.abs(np.asarray(out[i]).ravel() - exact))) for i in range(batch)]


def variance_ratio(sde, sampler, steps: Sequence[int] = STEPS) -> list[float]:
    """Output variance / closed form for each step count (40,000 pixels per count)."""
    batch, side = len(steps), 200
    guides = np.full((batch, side, side, 1), GUIDE, np.float32)
    out = np.asarray(
        sj.sdedit(
            GaussianScore(sde, MU, S),
            sde,
            guides,
            seed=11,
            t0=T0,
            n_steps=np.asarray(steps),
            predictor=sampler.predictor,
            **dict(sampler.options),
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
        var = (
            data_marginal(sde, MU, S, sde.eps)[1] / data_marginal(sde, MU, S, T0)[1] * sigma0
        ) ** 2
    return [float(out[i].var() / var) for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/solvers/solver_table.json")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help="labels of SOLVERS, commas")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="step counts, commas")
    args = parser.parse_args()
    labels, steps = args.solvers.split(","), [int(n) for n in args.steps.split(",")]
    unknown = sorted(set(labels) - set(SOLVERS))
    if unknown:
        parser.error(f"--solvers: unknown {unknown}; choose from {sorted(SOLVERS)}")
    started = time.perf_counter()
    rows = []
    for sde_name, sde in SDES.items():
        for label in labels:
            predictor, eta = SOLVERS[label]
            for grid in GRIDS:
                sampler = sj.Sampler(
                    predictor, max_steps=64, eta=eta, time_grid=grid, denoise=False
                )
                errors = (
                    ode_errors(sde, sampler, MU, S, T0, steps)
                    if not sampler.solver.stochastic
                    else None
                )
                ratios = variance_ratio(sde, sampler, steps)
                rows.append(
                    {
                        "sde": sde_name,
                        "solver": label,
                        "grid": grid,
                        "nfe_per_step": sampler.nfe_per_step,
                        "steps": steps,
                        "ode_error": errors,
                        "variance_ratio": ratios,
                    }
                )
    lines = [
        "| SDE | solver | grid | "
        + " | ".join(f"ODE err {n}" for n in steps)
        + " | "
        + " | ".join(f"var ratio {n}" for n in steps)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(steps)),
    ]
    for row in rows:
        errors = row["ode_error"] or [None] * len(steps)
        cells = ["-" if e is None else f"{e:.1e}" for e in errors]
        cells += [f"{r:.3f}" for r in row["variance_ratio"]]
        lines.append(
            f"| {row['sde']} | {row['solver']} | {row['grid']} | " + " | ".join(cells) + " |"
        )
    print("\n".join(lines))
    cpu = cpu_model_name()
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
