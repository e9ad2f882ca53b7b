"""Quality against network calls from a few-step evaluation: table, target check, plot.

    python -m sdedit_jax.evaluate --config configs/eval_emoji.py:few_step \
        --workdir runs/eval_few_step
    python -m sdedit_jax.tools.few_step_report runs/eval_few_step docs/evaluation/few_step

Reads ``results.json`` of the sweep (variant ``base`` is the paper's recipe,
the others ``<solver>@<nfe>``), copies it and ``results.csv`` to the output
folder, writes ``quality_vs_nfe.png`` and ``target.csv`` and prints a markdown
table. The target (issue 10): at <= 1/10 of the recipe's network calls, KID no
worse than the recipe's KID plus the recipe's KID std (over subsets), and L2 to
the guide within 5 % of the recipe's.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys

from matplotlib.figure import Figure

RECIPE = "base"


def target_rows(rows: list[dict]) -> list[dict]:
    """One row per (task, solver setting) with its gaps to the recipe and the verdict."""
    recipes = {r["task"]: r for r in rows if r["variant"] == RECIPE}
    out = []
    for row in rows:
        if row["variant"] in (RECIPE, "guides") or row["task"] not in recipes:
            continue
        recipe = recipes[row["task"]]
        kid_gap = row["kid"] - recipe["kid"]
        l2_ratio = row["l2"] / recipe["l2"]
        cheap = row["nfe"] * 10 <= recipe["nfe"]
        holds = cheap and kid_gap <= recipe["kid_std"] and abs(l2_ratio - 1) <= 0.05
        out.append(
            {
                "task": row["task"],
                "variant": row["variant"],
                "nfe": row["nfe"],
                "kid_x1e3": round(row["kid"] * 1e3, 2),
                "kid_std_x1e3": round(row["kid_std"] * 1e3, 2),
                "kid_minus_recipe_x1e3": round(kid_gap * 1e3, 2),
                "recipe_kid_std_x1e3": round(recipe["kid_std"] * 1e3, 2),
                "l2": round(row["l2"], 3),
                "l2_over_recipe": round(l2_ratio, 3),
                "target_holds": holds,
            }
        )
    return out


def plot(rows: list[dict]) -> Figure:
    tasks = sorted({r["task"] for r in rows if r["variant"] != "guides"})
    figure = Figure(figsize=(11, 4.2 * len(tasks)), layout="constrained")
    axes = figure.subplots(len(tasks), 2, squeeze=False)
    for (kid_axis, l2_axis), task in zip(axes, tasks, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        recipe = next(r for r in task_rows if r["variant"] == RECIPE)
        solvers = sorted({r["variant"].split("@")[0] for r in task_rows if "@" in r["variant"]})
        for solver in solvers:
            points = sorted(
                (r for r in task_rows if r["variant"].startswith(solver + "@")),
                key=lambda r: r["nfe"],
            )
            nfe = [p["nfe"] for p in points]
            kid_axis.errorbar(
                nfe,
                [p["kid"] * 1e3 for p in points],
                yerr=[p["kid_std"] * 1e3 for p in points],
                marker="o",
                capsize=3,
                label=solver,
            )
            l2_axis.plot(nfe, [p["l2"] for p in points], marker="o", label=solver)
        label = f"recipe: ancestral, {recipe['nfe']} calls"
        kid_axis.errorbar(
            [recipe["nfe"]],
            [recipe["kid"] * 1e3],
            yerr=[recipe["kid_std"] * 1e3],
            marker="s",
            color="k",
            capsize=3,
            label=label,
        )
        kid_axis.axhspan(
            (recipe["kid"] - recipe["kid_std"]) * 1e3,
            (recipe["kid"] + recipe["kid_std"]) * 1e3,
            color="k",
            alpha=0.08,
        )
        l2_axis.plot([recipe["nfe"]], [recipe["l2"]], marker="s", color="k", label=label)
        l2_axis.axhspan(recipe["l2"] * 0.95, recipe["l2"] * 1.05, color="k", alpha=0.08)
        for axis, name in (
            (kid_axis, "KID x1e3 (lower = more realistic)"),
            (l2_axis, "L2 to guide (lower = more faithful)"),
        ):
            axis.set_xscale("log")
            axis.set_xlabel("network calls per output (NFE)")
            axis.set_ylabel(name)
            axis.set_title(
                f"{task}, t0 = {recipe['t0']:g} (band: recipe ± std / ± 5 %)", fontsize=9
            )
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    return figure


def main(source: str, target: str) -> None:
    with open(os.path.join(source, "results.json")) as f:
        results = json.load(f)
    os.makedirs(target, exist_ok=True)
    for name in ("results.json", "results.csv"):
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    rows = results["rows"]
    verdicts = target_rows(rows)
    with open(os.path.join(target, "target.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(verdicts[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(verdicts)
    plot(rows).savefig(os.path.join(target, "quality_vs_nfe.png"), dpi=110)
    print("| task | setting | NFE | L2 | L2 / recipe | KID x1e3 | KID - recipe | target |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["variant"] == RECIPE:
            print(
                f"| {row['task']} | recipe (ancestral, N=1000) | {row['nfe']} | "
                f"{row['l2']:.3f} | 1 | {row['kid'] * 1e3:.1f} ± {row['kid_std'] * 1e3:.1f}"
                " | 0 | - |"
            )
    for v in verdicts:
        print(
            f"| {v['task']} | {v['variant']} | {v['nfe']} | {v['l2']:.3f} | "
            f"{v['l2_over_recipe']:.3f} | {v['kid_x1e3']:.1f} ± {v['kid_std_x1e3']:.1f} | "
            f"{v['kid_minus_recipe_x1e3']:+.1f} | {'holds' if v['target_holds'] else 'no'} |"
        )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
