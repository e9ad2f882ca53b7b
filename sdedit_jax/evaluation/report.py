"""Reports of a sweep: results.json/csv, the realism-faithfulness plot, contact sheets."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
from matplotlib.figure import Figure

from sdedit_jax.data import image_grid
from sdedit_jax.evaluation.inputs import (
    BASELINE_VARIANT,
    ImageSet,
)
from sdedit_jax.util import files

COLUMNS = (
    "task",
    "variant",
    "t0",
    "n_steps",
    "nfe",
    "examples",
    "l2",
    "l2_std",
    "mse",
    "psnr",
    "ssim",
    "l2_inside",
    "l2_outside",
    "kid",
    "kid_std",
    "kid_stderr",
    "fid",
    "seconds",
    "images_per_s",
)


def _strict_json(value):
    """JSON without NaN/Infinity (not JSON): non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def csv_text(rows: list[dict]) -> str:
    """The result rows as CSV with the ``COLUMNS`` header (inapplicable scores are empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in COLUMNS} for row in rows)
    return buffer.getvalue()


def table_text(rows: list[dict]) -> str:
    """A fixed-width table of the rows, for the terminal."""

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"{'task':<16}{'variant':<14}{'t0':>6}{'steps':>6}{'n':>5}{'L2':>8}{'PSNR':>7}"
        f"{'SSIM':>7}{'L2 out':>8}{'KID x1e3':>17}{'FID':>9}{'img/s':>8}"
    ]
    for row in rows:
        kid = f"{row['kid'] * 1e3:.2f} ± {row['kid_std'] * 1e3:.2f}"
        lines.append(
            f"{row['task'][:15]:<16}{row['variant'][:13]:<14}{row['t0']:>6.2f}{row['n_steps']:>6}"
            f"{row['examples']:>5}{row['l2']:>8.3f}{number(row['psnr'], 2):>7}"
            f"{number(row['ssim'], 3):>7}{number(row['l2_outside'], 3):>8}{kid:>17}"
            f"{row['fid']:>9.2f}{number(row['images_per_s'], 1):>8}"
        )
    return "\n".join(lines)


def _curves(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows per (task, variant), each starting from its task's guides (t0 = 0) row."""
    baselines = {r["task"]: r for r in rows if r["variant"] == BASELINE_VARIANT}
    curves: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["variant"] != BASELINE_VARIANT:
            curves.setdefault((row["task"], row["variant"]), [baselines[row["task"]]]).append(row)
    return {key: sorted(points, key=lambda r: r["t0"]) for key, points in curves.items()}


def plot_tradeoff(rows: list[dict], title: str) -> Figure:
    """KID (with std bars) and FID against L2 to the guide; every point labelled by its t0."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    kid_axis, fid_axis = figure.subplots(1, 2)
    for (task, variant), points in _curves(rows).items():
        l2 = [p["l2"] for p in points]
        label = f"{task} / {variant}"
        kid_axis.errorbar(
            l2,
            [p["kid"] for p in points],
            yerr=[p["kid_std"] for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
        fid_axis.plot(l2, [p["fid"] for p in points], marker="o", label=label)
        for axis, score in ((kid_axis, "kid"), (fid_axis, "fid")):
            for point in points:
                axis.annotate(
                    f"{point['t0']:g}",
                    (point["l2"], point[score]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
    for axis, metric in ((kid_axis, "KID"), (fid_axis, "FID")):
        axis.set_xlabel("L2 to guide (faithfulness; lower = more faithful)")
        axis.set_ylabel(f"{metric} to real images (lower = more realistic)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title + "  (labels: t0; t0=0 = the guides)", fontsize=10)
    return figure


def contact_rows(
    guides: ImageSet, outputs: dict[float, np.ndarray], count: int
) -> tuple[list[list[np.ndarray]], list[str], list[str]]:
    """(rows, column labels, row labels): guide | mask (masked tasks) | output per t0."""
    t0s = sorted(outputs)
    labels = ["guide"] + (["mask"] if guides.masked else []) + [f"t0={t:g}" for t in t0s]
    rows = []
    for index in range(min(count, len(guides.ids))):
        cells = [guides.images[index]]
        if guides.masked:
            cells.append(guides.masks[index] * 2.0 - 1.0)
        rows.append(cells + [outputs[t][index] for t in t0s])
    names = [os.path.splitext(i)[0] for i in guides.ids[: len(rows)]]
    return rows, labels, names


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_outputs(workdir: str, results: dict, sheets: dict) -> None:
    """results.json, results.csv, the trade-off plot and the contact sheets."""
    rows = results["rows"]
    files.publish_bytes(
        os.path.join(workdir, "results.json"),
        json.dumps(_strict_json(results), indent=1, allow_nan=False).encode(),
    )
    files.publish_bytes(os.path.join(workdir, "results.csv"), csv_text(rows).encode())
    title = (
        f"model {results['model']['sha256'][:12]}, {results['feature_extractor']} features, "
        f"{results['reference_images']} reference images"
    )
    files.publish_bytes(
        os.path.join(workdir, "realism_faithfulness.png"), _figure_png(plot_tradeoff(rows, title))
    )
    for (task, variant), (cells, labels, names) in sheets.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{task}_{variant}")
        sheet = image_grid.contact_sheet(cells, labels, names)
        files.publish_bytes(os.path.join(workdir, f"contact_{safe}.png"), _png(sheet))
