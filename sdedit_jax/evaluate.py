"""Realism versus faithfulness over t0: SDEdit's trade-off curve, from a config file.

    python -m sdedit_jax.evaluate --config configs/eval_emoji.py --workdir runs/eval_emoji
    python -m sdedit_jax.evaluate --config configs/eval_tiny.py --config.model_dir=/m --workdir /w

SDEdit's start time t0 trades faithfulness (how close the output stays to the
guide) against realism (how much the output looks like real data). This
module measures the curve: guides are synthesised from held-out real images
(``tasks``: stroke paintings, stroke edits, composites; see
:mod:`sdedit_jax.data.guide_inputs`), edited at every ``t0`` of ``t0s`` with
every sampler variant, and each setting is scored by

* faithfulness to the guide: SDEdit's L2 (Euclidean norm of the pixel
  difference in ``[0, 1]``), MSE, PSNR, SSIM, and for masked tasks the L2
  inside and outside the mask (outside must stay ~0);
* realism: KID (mean and std over random subsets) and FID between
  EfficientNet-Lite0 features of the outputs and of a reference set of real
  images (features cached in ``<workdir>/reference_features.npz``).

A ``t0 = 0`` row per task scores the guides themselves (perfectly faithful,
least realistic): the baseline every curve starts from.

All ``t0`` of a variant run in ONE compiled program: ``t0`` and the paper's
step count ``ceil(N * t0)`` are traced per-example values, and every task
always passes a mask (all ones when nothing is masked), so the program's
signature never changes. Results are deterministic given the config: an
output depends only on (seed, task, example id, t0, guide, mask), and KID
draws its subsets from ``seed``; the same subsets serve every setting, so
settings are compared on paired samples.

Outputs in ``workdir``: ``results.json`` (config, model, rows), ``results.csv``
(one row per setting), ``realism_faithfulness.png`` (KID and FID against L2,
points labelled by t0), ``contact_<task>_<variant>.png`` (guide | outputs per
t0) and ``throughput.jsonl``. In the JSON, non-finite values are ``null``: an
inapplicable score (``l2_outside`` of an unmasked task) or the guides' own PSNR,
which is infinite. ``seconds`` and ``images_per_s`` time the editing only; the
first t0 of each variant includes compiling its program. Evaluation runs in
one process (on all its local devices).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sdedit_jax import engine, files, pretrained, report  # noqa: E402
from sdedit_jax.data import guide_inputs, sinks  # noqa: E402
from sdedit_jax.job import sampler_from_config  # noqa: E402
from sdedit_jax.metrics import faithfulness, realism  # noqa: E402
from sdedit_jax.rng import string_id_words  # noqa: E402
from sdedit_jax.sampling.integrate import Sampler  # noqa: E402
from sdedit_jax.sampling.steps import StepRule  # noqa: E402
from sdedit_jax.stream import Progress  # noqa: E402

BASELINE_VARIANT = "guides"
REFERENCE_CACHE = "reference_features.npz"
# evaluate.py sets these input fields itself (from the model and the tasks).
_MANAGED_INPUT_FIELDS = ("generator", "generator_kwargs", "image_size", "channels", "seed", "t0")
_LOAD_BATCH = 64
COLUMNS = ("task", "variant", "t0", "n_steps", "nfe", "examples", "l2", "l2_std", "mse", "psnr",
           "ssim", "l2_inside", "l2_outside", "kid", "kid_std", "kid_stderr", "fid", "seconds",
           "images_per_s")


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images of one task (guides) or of the reference, in canonical order, in ``[-1, 1]``."""

    name: str
    ids: list[str]
    images: np.ndarray  # [N, H, W, C] float32
    masks: np.ndarray  # [N, H, W, 1] float32, 1 = editable

    @property
    def masked(self) -> bool:
        """Whether any pixel must be kept (only then are inside/outside scores meaningful)."""
        return bool(np.any(self.masks < 1.0))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One sampler setting of the sweep: a compiled program shared by every t0 and task."""

    name: str
    sampler: Sampler
    step_rule: StepRule
    repeats: int


# --- inputs ----------------------------------------------------------------------------------


def _input_mapping(base: Mapping, field: str, **managed) -> dict:
    """``base`` plus the fields evaluation controls; setting those in the config is an error."""
    values = dict(base)
    clash = sorted(set(values) & set(_MANAGED_INPUT_FIELDS))
    if clash:
        raise ValueError(f"{field}: do not set {clash}; evaluation derives them from the model, "
                         "tasks, generator_kwargs and seed")
    return {**values, **managed}


def load_image_set(input_config: Mapping, name: str, what: str, limit: int = 0) -> ImageSet:
    """Reads the first ``limit`` (0 = all) examples of a guide input in canonical order.

    ``name`` names the set (a task), ``what`` describes it in errors.

    Raises:
        ValueError: some examples failed to decode (listing them), or none exist.
    """
    stream = guide_inputs.make_guide_dataset(input_config, batch_size_per_host=_LOAD_BATCH,
                                             process_index=0, process_count=1)
    ids, images, masks, errors = [], [], [], []
    for batch in stream.dataset.as_numpy_iterator():
        for row in np.nonzero(batch["valid"])[0]:
            if not batch["ok"][row]:
                errors.append(batch["error"][row].decode())
                continue
            ids.append(batch["id"][row].decode())
            images.append(batch["guide"][row])
            masks.append(batch["mask"][row])
        if limit and len(ids) >= limit:
            break
    if errors:
        listed = "\n  ".join(errors[:10])
        raise ValueError(f"{what}: {len(errors)} input(s) failed (fix or remove them):\n  {listed}")
    if not ids:
        raise ValueError(f"{what}: no images in {input_config.get('path')!r}")
    keep = limit or len(ids)
    return ImageSet(name, ids[:keep], np.stack(images[:keep]), np.stack(masks[:keep]))


def task_generator(config: ml_collections.ConfigDict, task: str) -> tuple[str, dict]:
    """(generator name, its keyword arguments) of one task.

    A task is a guide generator's name, or any name whose
    ``config.generator_kwargs`` entry names its ``generator`` (so one generator
    can appear twice with different settings, e.g. a cruder stroke painting).
    """
    kwargs = config.generator_kwargs.get(task, {})
    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
    generator = kwargs.pop("generator", task)
    if generator not in guide_inputs.GENERATOR_NAMES:
        raise ValueError(f"config.tasks: task {task!r} uses generator {generator!r}; known: "
                         f"{', '.join(guide_inputs.GENERATOR_NAMES)} (or name one in "
                         f"config.generator_kwargs.{task}.generator)")
    return generator, kwargs


def load_guides(config: ml_collections.ConfigDict, task: str, image_size: int,
                channels: int) -> ImageSet:
    """The guides of one task (see :func:`task_generator`), made from ``config.input``'s images."""
    generator, kwargs = task_generator(config, task)
    mapping = _input_mapping(
        config.input.to_dict(), "config.input", generator=generator,
        generator_kwargs=kwargs,
        image_size=(image_size, image_size), channels=channels, seed=config.seed)
    return load_image_set(mapping, task, f"config.input (guides of task {task!r})",
                          config.max_guides)


def with_samples(guides: ImageSet, samples: int) -> ImageSet:
    """Each guide ``samples`` times; copy ``k > 0`` of id ``i`` is ``i#k`` (its own noise).

    Copy 0 keeps the plain id, so a run with more samples per guide extends
    (and reproduces) the run with one.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"config.samples_per_guide: must be a positive int, got {samples!r}")
    ids = [i if k == 0 else f"{i}#{k}" for k in range(samples) for i in guides.ids]
    return ImageSet(guides.name, ids, np.tile(guides.images, (samples, 1, 1, 1)),
                    np.tile(guides.masks, (samples, 1, 1, 1)))


def load_reference(config: ml_collections.ConfigDict, image_size: int,
                   channels: int) -> ImageSet:
    """The real images realism is measured against, all paths concatenated in order."""
    reference = config.reference.to_dict()
    paths = reference.pop("paths")
    limit = reference.pop("max_images")
    if not paths:
        raise ValueError("config.reference.paths: give at least one source of real images")
    parts = []
    for path in paths:
        mapping = _input_mapping(dict(reference, path=path), "config.reference",
                                 image_size=(image_size, image_size), channels=channels)
        parts.append(load_image_set(mapping, "reference", f"config.reference.paths ({path!r})"))
    ids = [f"{path}/{i}" for path, part in zip(paths, parts, strict=True) for i in part.ids]
    images = np.concatenate([p.images for p in parts])
    masks = np.concatenate([p.masks for p in parts])
    keep = limit or len(ids)
    return ImageSet("reference", ids[:keep], images[:keep], masks[:keep])


def variants_from_config(config: ml_collections.ConfigDict) -> list[Variant]:
    """The base sampler (``config.sampler``, ``config.repeats``) plus each override in ``variants``.

    A variant is a dict of ``config.sampler`` fields and/or ``repeats``, with
    an optional ``name`` (default: its overrides, e.g. ``predictor=ode_euler``).
    """
    base = config.sampler.to_dict()
    specs = [{"name": "base"}] + [dict(v) for v in config.variants]
    variants, names = [], set()
    for index, spec in enumerate(specs):
        where = "config.sampler" if index == 0 else f"config.variants[{index - 1}]"
        unknown = sorted(set(spec) - set(base) - {"name", "repeats"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: name, repeats, "
                             f"{', '.join(sorted(base))}")
        overrides = {k: v for k, v in spec.items() if k != "name"}
        name = str(spec.get("name") or ",".join(f"{k}={v}" for k, v in sorted(overrides.items())))
        if name in names or name == BASELINE_VARIANT:
            raise ValueError(f"{where}: variant name {name!r} is already used")
        names.add(name)
        repeats = overrides.pop("repeats", config.repeats)
        try:
            sampler, step_rule = sampler_from_config(ml_collections.ConfigDict({**base,
                                                                                **overrides}))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        variants.append(Variant(name, sampler, step_rule, repeats))
    return variants


def check_t0s(t0s, sde) -> tuple[float, ...]:
    """The sweep's start times, each in the SDE's ``(eps, T]``."""
    values = tuple(float(t) for t in t0s)
    if not values:
        raise ValueError("config.t0s: give at least one t0")
    bad = [t for t in values if not sde.eps < t <= sde.T]
    if bad:
        raise ValueError(f"config.t0s: {bad} outside ({sde.eps}, {sde.T}] (the SDE's eps..T)")
    if len(set(values)) != len(values):
        raise ValueError(f"config.t0s: repeated values in {values}")
    return values


# --- features ---------------------------------------------------------------------------------


def to_unit_rgb(images: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` model images -> ``[0, 1]`` RGB, clipped as a saved PNG would be."""
    images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def image_features(extractor, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of ``[-1, 1]`` images in fixed-size (padded) batches: one compile for any count."""
    unit = to_unit_rgb(images)
    padded = np.concatenate([unit, np.zeros((-len(unit) % batch_size,) + unit.shape[1:],
                                            np.float32)])
    batches = (padded[i:i + batch_size] for i in range(0, len(padded), batch_size))
    return realism.extract_features(extractor, batches)[:len(unit)]


def _reference_key(extractor, reference: ImageSet) -> str:
    digest = hashlib.sha256(f"{extractor.name}:{reference.images.shape}".encode())
    digest.update(np.ascontiguousarray(reference.images, np.float32).tobytes())
    return digest.hexdigest()


def reference_features(extractor, reference: ImageSet, cache_path: str,
                       batch_size: int) -> tuple[np.ndarray, bool]:
    """Reference features, from ``cache_path`` when it holds these exact images; (features, hit)."""
    key = _reference_key(extractor, reference)
    if files.exists(cache_path):
        with np.load(io.BytesIO(files.read_bytes(cache_path))) as cached:
            if str(cached["key"]) == key:
                return cached["features"], True
    features = image_features(extractor, reference.images, batch_size)
    buffer = io.BytesIO()
    np.savez(buffer, features=features, key=np.array(key))
    sinks.atomic_write_bytes(cache_path, buffer.getvalue())
    return features, False


def fid_to_reference(features: np.ndarray, reference: realism.GaussianStats) -> float:
    """FID of a feature set against reference statistics, exactly, in O(n d^2) when n <= d.

    FID needs ``tr((C_r^1/2 C C_r^1/2)^1/2)``. With ``C = A^T A / (n - 1)`` (``A``:
    the n centred samples as rows), ``C_r^1/2 C C_r^1/2`` has the same non-zero
    eigenvalues as the n x n matrix ``A C_r A^T / (n - 1)``, so a sweep's small
    output sets never eigendecompose a d x d matrix (1280 x 1280 for
    EfficientNet-Lite0, seconds each on a CPU). Larger sets use
    ``realism.fid_from_stats``.
    """
    stats = realism.stats_from_features(features)
    count, dim = np.shape(features)
    if count > dim:
        return realism.fid_from_stats(stats, reference)
    centred = np.asarray(features, np.float64) - stats.mean
    small = centred @ reference.covariance @ centred.T / (count - 1)
    eigenvalues = np.linalg.eigvalsh(0.5 * (small + small.T))
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    difference = stats.mean - reference.mean
    value = (difference @ difference + np.sum(centred**2) / (count - 1)
             + np.trace(reference.covariance) - 2.0 * trace_sqrt)
    return float(max(value, 0.0))  # rounding can dip below 0 for equal sets, as in realism


# --- one setting ------------------------------------------------------------------------------


def edit_guides(editor: engine.Editor, placed, guides: ImageSet, t0: float, n_steps: int,
                seed: int, on_chunk: Callable[[int], None]) -> np.ndarray:
    """Edits every guide at one ``t0``, ``editor.global_batch`` rows at a time."""
    words = string_id_words([f"{guides.name}/{i}" for i in guides.ids])
    outputs = []
    for start in range(0, len(guides.ids), editor.global_batch):
        rows = slice(start, start + editor.global_batch)
        count = len(guides.ids[rows])
        batch = engine.EditBatch(
            guides=guides.images[rows], seeds=np.full((count,), seed, np.int32),
            id_words=words[rows], t0=np.full((count,), t0, np.float32),
            n_steps=np.full((count,), n_steps, np.int32), mask=guides.masks[rows])
        outputs.append(np.asarray(editor.run(placed, batch)))
        on_chunk(count)
    return np.concatenate(outputs)


def _mean(values) -> float | None:
    """Mean over examples; None where the score does not apply (all NaN)."""
    values = np.asarray(values, np.float64)
    return None if np.all(np.isnan(values)) else float(np.mean(values))


def setting_scores(outputs: np.ndarray, guides: ImageSet, features: np.ndarray,
                   reference: np.ndarray, reference_stats: realism.GaussianStats,
                   kid_key: jax.Array, kid_subset_size: int, kid_subsets: int) -> dict:
    """Faithfulness (means over examples) and realism of one setting's outputs."""
    scores = faithfulness.faithfulness_scores(
        jnp.asarray(to_unit_rgb(outputs)), jnp.asarray(to_unit_rgb(guides.images)),
        jnp.asarray(guides.masks) if guides.masked else None)
    kid = realism.kid(features, reference, kid_key, kid_subset_size, kid_subsets)
    fid = fid_to_reference(features, reference_stats)
    l2 = np.asarray(scores["l2"], np.float64)
    return {
        "l2": float(l2.mean()), "l2_std": float(l2.std(ddof=1)) if len(l2) > 1 else 0.0,
        "mse": _mean(scores["mse"]), "psnr": _mean(scores["psnr"]), "ssim": _mean(scores["ssim"]),
        "l2_inside": _mean(scores["l2_inside"]) if guides.masked else None,
        "l2_outside": _mean(scores["l2_outside"]) if guides.masked else None,
        "kid": kid.mean, "kid_std": kid.std, "kid_stderr": kid.stderr, "fid": fid,
    }


# --- reports ----------------------------------------------------------------------------------


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

    lines = [f"{'task':<16}{'variant':<14}{'t0':>6}{'steps':>6}{'n':>5}{'L2':>8}{'PSNR':>7}"
             f"{'SSIM':>7}{'L2 out':>8}{'KID x1e3':>17}{'FID':>9}{'img/s':>8}"]
    for row in rows:
        kid = f"{row['kid'] * 1e3:.2f} ± {row['kid_std'] * 1e3:.2f}"
        lines.append(
            f"{row['task'][:15]:<16}{row['variant'][:13]:<14}{row['t0']:>6.2f}{row['n_steps']:>6}"
            f"{row['examples']:>5}{row['l2']:>8.3f}{number(row['psnr'], 2):>7}"
            f"{number(row['ssim'], 3):>7}{number(row['l2_outside'], 3):>8}{kid:>17}"
            f"{row['fid']:>9.2f}{number(row['images_per_s'], 1):>8}")
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
        kid_axis.errorbar(l2, [p["kid"] for p in points], yerr=[p["kid_std"] for p in points],
                          marker="o", capsize=3, label=label)
        fid_axis.plot(l2, [p["fid"] for p in points], marker="o", label=label)
        for point in points:
            text = f"{point['t0']:g}"
            kid_axis.annotate(text, (point["l2"], point["kid"]), textcoords="offset points",
                              xytext=(4, 4), fontsize=8)
            fid_axis.annotate(text, (point["l2"], point["fid"]), textcoords="offset points",
                              xytext=(4, 4), fontsize=8)
    for axis, metric in ((kid_axis, "KID"), (fid_axis, "FID")):
        axis.set_xlabel("L2 to guide (faithfulness; lower = more faithful)")
        axis.set_ylabel(f"{metric} to real images (lower = more realistic)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title + "  (labels: t0; t0=0 = the guides)", fontsize=10)
    return figure


def contact_rows(guides: ImageSet, outputs: dict[float, np.ndarray], count: int
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
    names = [os.path.splitext(i)[0] for i in guides.ids[:len(rows)]]
    return rows, labels, names


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


# --- the sweep --------------------------------------------------------------------------------


def _row(task: str, variant: str, t0: float, n_steps: int, count: int, scores: dict,
         seconds: float | None, nfe: int = 0) -> dict:
    rate = None if not seconds else round(count / seconds, 3)
    return {"task": task, "variant": variant, "t0": t0, "n_steps": n_steps, "nfe": nfe,
            "examples": count,
            **scores, "seconds": None if seconds is None else round(seconds, 3),
            "images_per_s": rate}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Scores sets of outputs against one reference; the same KID subsets for every setting."""

    extractor: realism.FeatureExtractor
    reference: np.ndarray  # [N, dim] features
    reference_stats: realism.GaussianStats
    kid_key: jax.Array
    kid_subset_size: int
    kid_subsets: int
    feature_batch_size: int

    def __call__(self, outputs: np.ndarray, guides: ImageSet) -> dict:
        features = image_features(self.extractor, outputs, self.feature_batch_size)
        return setting_scores(outputs, guides, features, self.reference, self.reference_stats,
                              self.kid_key, self.kid_subset_size, self.kid_subsets)


def _setting_key(model: pretrained.LoadedModel, variant: Variant, guides: ImageSet, t0: float,
                 n_steps: int, seed: int) -> str:
    """A digest of everything one setting's outputs depend on (the resume cache's key)."""
    spec = {"model": model.checksum, "sampler": dataclasses.asdict(variant.sampler),
            "repeats": variant.repeats, "task": guides.name, "t0": t0, "n_steps": n_steps,
            "seed": seed, "ids": guides.ids}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(guides.images).tobytes())
    digest.update(np.ascontiguousarray(guides.masks).tobytes())
    return digest.hexdigest()[:24]


def cached_edit(cache_dir: str, key: str, edit: Callable[[], np.ndarray]
                ) -> tuple[np.ndarray, float]:
    """(outputs, editing seconds) of one setting, from ``cache_dir`` when an earlier run made them.

    A long sweep that is stopped resumes where it stopped: finished settings
    are read back (bit-identical, as editing is deterministic), not recomputed.
    """
    path = os.path.join(cache_dir, f"{key}.npz")
    if os.path.exists(path):
        with np.load(path) as cached:
            return cached["outputs"], float(cached["seconds"])
    start = time.perf_counter()
    outputs = edit()
    seconds = time.perf_counter() - start
    buffer = io.BytesIO()
    np.savez(buffer, outputs=outputs, seconds=np.float64(seconds))
    sinks.atomic_write_bytes(path, buffer.getvalue())
    return outputs, seconds


def sweep(model: pretrained.LoadedModel, variants: list[Variant], task_guides: list[ImageSet],
          t0s: tuple[float, ...], config: ml_collections.ConfigDict, scorer: Scorer,
          throughput_log: str, cache_dir: str | None = None,
          on_row: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], dict]:
    """Edits and scores every (variant, task, t0); returns (rows, contact-sheet cells per curve).

    With ``cache_dir``, each setting's outputs are kept there and reused by a
    rerun; ``on_row(rows so far)`` is called after each setting.
    """
    editors = [engine.Editor(model.sde, v.sampler, v.repeats,
                             per_device_batch=config.per_device_batch) for v in variants]
    total_rows = len(variants) * len(t0s) * sum(len(g.ids) for g in task_guides)
    progress = Progress(total_rows, throughput_log, label="evaluate")
    done = {"chunks": 0, "rows": 0}

    def on_chunk(count):
        done["chunks"] += 1
        done["rows"] += count
        progress.update(done["chunks"], done["rows"])

    rows, sheets = [], {}
    for variant, editor in zip(variants, editors, strict=True):
        placed = editor.place_score(model.score_fn)
        for guides in task_guides:
            kept = {}
            for t0 in t0s:
                # The config's float64 t0: float32(0.8) * 200 rounds up to 161 steps.
                n_steps = int(variant.step_rule.steps_for(np.float64(t0)))

                def edit(editor=editor, placed=placed, guides=guides, t0=t0, n_steps=n_steps):
                    return edit_guides(editor, placed, guides, t0, n_steps, config.seed, on_chunk)

                if cache_dir is None:
                    start = time.perf_counter()
                    outputs = edit()
                    seconds = time.perf_counter() - start
                else:
                    key = _setting_key(model, variant, guides, t0, n_steps, config.seed)
                    outputs, seconds = cached_edit(cache_dir, key, edit)
                nfe = n_steps * variant.sampler.nfe_per_step * variant.repeats
                rows.append(_row(guides.name, variant.name, t0, n_steps, len(guides.ids),
                                 scorer(outputs, guides), seconds, nfe))
                if on_row is not None:
                    on_row(rows)
                kept[t0] = outputs[:config.contact_sheet_examples]
                _log(f"[{guides.name} {variant.name} t0={t0:g}] {len(guides.ids)} images, "
                     f"{n_steps} steps, {seconds:.1f}s ({len(guides.ids) / seconds:.2f} img/s)")
            sheets[(guides.name, variant.name)] = contact_rows(
                guides, kept, config.contact_sheet_examples)
    progress.update(done["chunks"], done["rows"], force=True)
    return rows, sheets


def run_evaluation(config: ml_collections.ConfigDict, workdir: str,
                   model: pretrained.LoadedModel | None = None,
                   extractor: realism.FeatureExtractor | None = None) -> dict:
    """Runs the whole sweep and writes every output to ``workdir``; returns ``results.json``'s dict.

    Args:
        config: an evaluation config (see ``configs/eval_emoji.py``).
        workdir: output folder (created).
        model: a loaded model to use instead of ``config.model_dir`` (tests pass
            analytic score functions this way).
        extractor: realism features to use instead of ``config.feature_extractor``.
    """
    if jax.process_count() != 1:
        raise ValueError("evaluate: runs in a single process; start it without jax.distributed")
    started = time.perf_counter()
    files.makedirs(workdir)
    model = pretrained.load_model(config.model_dir) if model is None else model
    t0s = check_t0s(config.t0s, model.sde)
    variants = variants_from_config(config)
    if not config.tasks:
        raise ValueError("config.tasks: give at least one guide generator")
    samples = config.get("samples_per_guide", 1)
    task_guides = [with_samples(load_guides(config, task, model.image_size, model.num_channels),
                                samples) for task in config.tasks]
    reference = load_reference(config, model.image_size, model.num_channels)
    if extractor is None:
        extractor = realism.load_feature_extractor(
            config.feature_extractor, config.feature_weights_path or None
        )
    reference_feats, cache_hit = reference_features(
        extractor, reference, os.path.join(workdir, REFERENCE_CACHE), config.feature_batch_size)
    _log(f"[evaluate] {len(reference.ids)} reference images "
         f"({'cached' if cache_hit else 'computed'} features), "
         f"{', '.join(f'{g.name}: {len(g.ids)}' for g in task_guides)} guides")
    smallest = min([len(reference.ids)] + [len(g.ids) for g in task_guides])
    scorer = Scorer(extractor, reference_feats, realism.stats_from_features(reference_feats),
                    jax.random.key(config.seed), min(config.kid.subset_size, smallest),
                    config.kid.num_subsets, config.feature_batch_size)
    baselines = [_row(g.name, BASELINE_VARIANT, 0.0, 0, len(g.ids), scorer(g.images, g), None)
                 for g in task_guides]
    cache_dir = os.path.join(workdir, "outputs")
    os.makedirs(cache_dir, exist_ok=True)

    def write_partial(rows):
        sinks.atomic_write_bytes(os.path.join(workdir, "results.partial.csv"),
                                 csv_text(baselines + rows).encode())

    rows, sheets = sweep(model, variants, task_guides, t0s, config, scorer,
                         os.path.join(workdir, "throughput.jsonl"), cache_dir, write_partial)
    results = {
        "workdir": workdir, "config": config.to_dict(),
        "model": {"path": model.path, "sha256": model.checksum, "sde": type(model.sde).__name__},
        "feature_extractor": extractor.name, "reference_images": len(reference.ids),
        "reference_cache_hit": cache_hit, "kid_subset_size": scorer.kid_subset_size,
        "variants": [{"name": v.name, **dataclasses.asdict(v.sampler), "repeats": v.repeats,
                      "grid_used": v.sampler.grid_name, "nfe_per_step": v.sampler.nfe_per_step}
                     for v in variants],
        "rows": baselines + rows, "seconds": round(time.perf_counter() - started, 2),
    }
    write_outputs(workdir, results, sheets)
    print(table_text(results["rows"]))
    return results


def write_outputs(workdir: str, results: dict, sheets: dict) -> None:
    """results.json, results.csv, the trade-off plot and the contact sheets."""
    rows = results["rows"]
    sinks.atomic_write_bytes(os.path.join(workdir, "results.json"),
                             json.dumps(_strict_json(results), indent=1,
                                        allow_nan=False).encode())
    sinks.atomic_write_bytes(os.path.join(workdir, "results.csv"), csv_text(rows).encode())
    title = (f"model {results['model']['sha256'][:12]}, {results['feature_extractor']} features, "
             f"{results['reference_images']} reference images")
    sinks.atomic_write_bytes(os.path.join(workdir, "realism_faithfulness.png"),
                             _figure_png(plot_tradeoff(rows, title)))
    for (task, variant), (cells, labels, names) in sheets.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{task}_{variant}")
        sheet = report.contact_sheet(cells, labels, names)
        sinks.atomic_write_bytes(os.path.join(workdir, f"contact_{safe}.png"), _png(sheet))


def _define_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """The command line's flags, defined only when this module is the program.

    Importing the module (tests, notebooks, other tools such as
    ``sdedit_jax.main`` with its own ``--config``) must not claim flag names.
    """
    config = config_flags.DEFINE_config_file("config", "configs/eval_emoji.py",
                                             "evaluation config file")
    workdir = flags.DEFINE_string("workdir", "runs/eval_emoji", "output folder")
    return config, workdir


def main(argv: list[str], config_flag: flags.FlagHolder, workdir_flag: flags.FlagHolder) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to jax
    run_evaluation(config_flag.value, workdir_flag.value)


if __name__ == "__main__":
    _config_flag, _workdir_flag = _define_flags()
    app.run(lambda argv: main(argv, _config_flag, _workdir_flag))
