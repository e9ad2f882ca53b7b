"""Quality against network calls from a few-step evaluation: verdicts, plot, tables.

    python -m sdedit_jax.evaluate --config configs/eval_emoji.py:few_step \
        --workdir runs/eval_few_step
    python -m sdedit_jax.tools.few_step_report runs/eval_few_step docs/evaluation/few_step

Reads ``results.json`` of the sweep, or ``results.partial.csv`` while a later
run of it is still going (variant ``base`` is the paper's recipe, the others
``<solver>@<nfe>``), copies the result files to the output folder, writes
``quality_vs_nfe.png`` and ``target.csv`` and prints two markdown tables: the
recipe's scores per (task, t0), and every solver setting's gap to the recipe
at the same (task, t0). The target (issue 10): at <= 1/10 of the recipe's
network calls, KID no worse than the recipe's KID plus the recipe's KID std
(over subsets), and L2 to the guide within 5 % of the recipe's.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys

from matplotlib.figure import Figure

RECIPE = "base"


def _setting(row: dict) -> tuple[str, float]:
    return row["task"], row["t0"]


def target_rows(rows: list[dict]) -> list[dict]:
    """One row per (task, t0, solver setting): its gaps to the recipe at that task and t0."""
    recipes = {_setting(r): r for r in rows if r["variant"] == RECIPE}
    out = []
    for row in rows:
        if row["variant"] in (RECIPE, "guides") or _setting(row) not in recipes:
            continue
        recipe = recipes[_setting(row)]
        kid_gap = row["kid"] - recipe["kid"]
        l2_ratio = row["l2"] / recipe["l2"]
        cheap = row["nfe"] * 10 <= recipe["nfe"]
        quality = kid_gap <= recipe["kid_std"] and abs(l2_ratio - 1) <= 0.05
        out.append(
            {
                "task": row["task"],
                "t0": row["t0"],
                "variant": row["variant"],
                "nfe": row["nfe"],
                "recipe_nfe": recipe["nfe"],
                "kid_x1e3": round(row["kid"] * 1e3, 2),
                "kid_std_x1e3": round(row["kid_std"] * 1e3, 2),
                "kid_minus_recipe_x1e3": round(kid_gap * 1e3, 2),
                "recipe_kid_std_x1e3": round(recipe["kid_std"] * 1e3, 2),
                "l2": round(row["l2"], 3),
                "l2_over_recipe": round(l2_ratio, 3),
                "quality_holds": quality,
                "target_holds": cheap and quality,
            }
        )
    return out


def _solver_points(rows: list[dict]) -> dict[str, list[dict]]:
    solvers = sorted({r["variant"].split("@")[0] for r in rows if "@" in r["variant"]})
    return {
        solver: sorted(
            (r for r in rows if r["variant"].startswith(solver + "@")), key=lambda r: r["nfe"]
        )
        for solver in solvers
    }


def _plot_setting(kid_axis, l2_axis, rows: list[dict]) -> None:
    """KID and L2 against NFE for one (task, t0), with the recipe's tolerance bands."""
    recipe = next(r for r in rows if r["variant"] == RECIPE)
    for solver, points in _solver_points(rows).items():
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
    kid = recipe["kid"] * 1e3
    kid_std = recipe["kid_std"] * 1e3
    kid_axis.errorbar([recipe["nfe"]], [kid], yerr=[kid_std], marker="s", color="k", capsize=3)
    kid_axis.axhspan(kid - kid_std, kid + kid_std, color="k", alpha=0.08)
    l2_axis.plot([recipe["nfe"]], [recipe["l2"]], marker="s", color="k", label=label)
    l2_axis.axhspan(recipe["l2"] * 0.95, recipe["l2"] * 1.05, color="k", alpha=0.08)
    for axis, name in ((kid_axis, "KID x1e3 (lower = more realistic)"), (l2_axis, "L2 to guide")):
        axis.set_xscale("log")
        axis.set_xlabel("network calls per output (NFE)")
        axis.set_ylabel(name)
        axis.set_title(f"{recipe['task']}, t0 = {recipe['t0']:g}", fontsize=9)
        axis.grid(alpha=0.3)
    l2_axis.legend(fontsize=7)


def plot(rows: list[dict]) -> Figure:
    """One column per t0; per task a KID row and an L2 row (bands: recipe ± std / ± 5 %)."""
    recipes = sorted(_setting(r) for r in rows if r["variant"] == RECIPE)
    tasks = sorted({task for task, _ in recipes})
    t0s = sorted({t0 for _, t0 in recipes})
    figure = Figure(figsize=(4.6 * len(t0s), 3.6 * 2 * len(tasks)), layout="constrained")
    axes = figure.subplots(2 * len(tasks), len(t0s), squeeze=False)
    for i, task in enumerate(tasks):
        for j, t0 in enumerate(t0s):
            setting_rows = [r for r in rows if _setting(r) == (task, t0)]
            if any(r["variant"] == RECIPE for r in setting_rows):
                _plot_setting(axes[2 * i, j], axes[2 * i + 1, j], setting_rows)
    return figure


def _verdict(v: dict) -> str:
    if v["target_holds"]:
        return "**holds**"
    return "quality holds, > 1/10 of the calls" if v["quality_holds"] else "no"


def markdown_tables(rows: list[dict], verdicts: list[dict]) -> str:
    """The recipe's scores per (task, t0), then each setting as 'KID gap / L2 ratio verdict'."""
    recipes = sorted((r for r in rows if r["variant"] == RECIPE), key=_setting)
    lines = [
        "| task | t0 | recipe NFE | L2 | KID x1e3 |",
        "|---|---|---|---|---|",
        *(
            f"| {r['task']} | {r['t0']:g} | {r['nfe']} | {r['l2']:.3f} | "
            f"{r['kid'] * 1e3:.1f} ± {r['kid_std'] * 1e3:.1f} |"
            for r in recipes
        ),
        "",
    ]
    columns = [_setting(r) for r in recipes]
    cells = {(v["variant"], (v["task"], v["t0"])): v for v in verdicts}
    settings = sorted(
        {v["variant"] for v in verdicts}, key=lambda s: (s.split("@")[0], int(s.split("@")[1]))
    )
    lines.append("| setting | " + " | ".join(f"{task} t0={t0:g}" for task, t0 in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for setting in settings:
        row = [setting]
        for column in columns:
            v = cells.get((setting, column))
            row.append(
                "-"
                if v is None
                else f"{v['kid_minus_recipe_x1e3']:+.1f} / {v['l2_over_recipe']:.3f} " + _verdict(v)
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _number(text: str) -> int | float | None:
    if text == "":
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def load_rows(source: str) -> tuple[list[dict], list[str]]:
    """The sweep's rows and the result files they came from.

    A finished run writes ``results.json`` last; a run still going (or stopped)
    has rewritten ``results.partial.csv`` after it, with the settings finished so
    far, and those are reported as they are.
    """
    finished, partial = (os.path.join(source, n) for n in ("results.json", "results.partial.csv"))
    mtime = lambda path: os.stat(path).st_mtime_ns if os.path.exists(path) else -1  # noqa: E731
    if mtime(finished) >= mtime(partial):
        with open(finished) as f:
            return json.load(f)["rows"], ["results.json", "results.csv"]
    with open(partial, newline="") as f:
        rows = [
            {k: v if k in ("task", "variant") else _number(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
    return rows, ["results.partial.csv"]


def main(source: str, target: str) -> None:
    rows, result_files = load_rows(source)
    os.makedirs(target, exist_ok=True)
    for name in result_files:
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    verdicts = target_rows(rows)
    with open(os.path.join(target, "target.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(verdicts[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(verdicts)
    plot(rows).savefig(os.path.join(target, "quality_vs_nfe.png"), dpi=100)
    print(markdown_tables(rows, verdicts))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
