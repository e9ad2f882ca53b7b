"""Preview edits: requests checked, queued, micro-batched into the engine's program, cached.

Every request becomes ``samples`` rows (seeds ``seed, seed + 1, ...``), each with an id
fixed before it is edited (:func:`row_id`), so a saved row edits to the same bytes in
a job. A worker thread takes rows of one (preset, K) from the queue, up to the
editor's global batch at a time, whatever their t0, mask, seed or prompt: those are
traced (a text model's prompts as per-row text states, made by the job's own
:func:`sdedit_jax.jobs.text.conditioner_for`), so each (preset, K) compiles once, and a
text model's rows guided or not (guidance scale > 1 or <= 1; the job carries the
negative half exactly when some row guides) once each. Results are cached by (guide,
mask, settings, seed).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import math
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sdedit_jax import engine, rng
from sdedit_jax.data import guide_inputs
from sdedit_jax.data.guide_inputs.catalog import SEED_RANGE
from sdedit_jax.jobs import checks, text
from sdedit_jax.jobs.sinks import png_bytes
from sdedit_jax.studio import presets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The job writes PNGs at zlib level 1 (configs/default.py output.png_compression).
PNG_COMPRESSION = 1


class Busy(Exception):
    """The queue is full; the message says why (the server answers 503)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's edit settings (``t0`` and ``guidance_scale`` already rounded to the
    float32 the job reads; ``guidance_scale`` None: the model takes no text)."""

    t0: float
    repeats: int
    seed: int
    samples: int
    preset: str
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float | None = None

    @property
    def unguided(self) -> bool:
        """A text row without classifier-free guidance (its program has no negative half)."""
        return self.guidance_scale is not None and self.guidance_scale <= 1

    @property
    def program(self) -> tuple[str, int, bool]:
        """What selects the compiled program: rows of one key share a batch."""
        return self.preset, self.repeats, self.unguided


@dataclasses.dataclass(frozen=True)
class Row:
    """One preview: decoded guide ``[H, W, C]`` and mask ``[H, W, 1]``, its id and key."""

    id: str
    seed: int
    guide: np.ndarray
    mask: np.ndarray
    settings: Settings
    cache_key: tuple


def _integer(body: Mapping[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")
    return value


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or not guide_inputs.text.is_utf8(value):
        raise ValueError(f"{name}: expected a string, got {value!r}")
    return value


def text_settings(body: Mapping[str, Any], takes_text: bool) -> dict[str, Any]:
    """The request's prompt, negative prompt and guidance scale, checked as a manifest
    row's are; a model that takes no text refuses any of them by name."""
    fields = {"prompt": _text(body, "prompt"), "negative_prompt": _text(body, "negative_prompt")}
    if not takes_text:
        named = [f for f in guide_inputs.text.FIELDS if body.get(f) not in (None, "")]
        if named:
            raise ValueError(f"{named[0]}: this model takes no text, got {body[named[0]]!r}")
        return fields
    return {**fields, "guidance_scale": _guidance(body)}


def _guidance(body: Mapping[str, Any]) -> float:
    """The guidance scale as the float32 the job reads back, finite and >= 0 as the job
    requires of a row (so a value that overflows float32 is refused here, not there)."""
    scale = body.get("guidance_scale", checks.DEFAULT_GUIDANCE_SCALE)
    rounded = math.nan
    if not isinstance(scale, bool) and isinstance(scale, (int, float)):
        with np.errstate(over="ignore"), contextlib.suppress(OverflowError):
            rounded = float(np.float32(scale))
    if not (math.isfinite(rounded) and rounded >= 0):
        raise ValueError(f"guidance_scale: expected a finite float32 >= 0, got {scale!r}")
    return rounded


def parse_settings(
    body: Mapping[str, Any],
    sde_domain: tuple[float, float],
    *,
    max_samples: int,
    max_repeats: int,
    takes_text: bool = False,
) -> Settings:
    """The request's settings, each checked (a ``ValueError`` names the field and value)."""
    eps, end = sde_domain
    t0 = body.get("t0", 0.5)
    if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not eps < t0 <= end:
        raise ValueError(f"t0: expected a number in ({eps}, {end}], got {t0!r}")
    samples = _integer(body, "samples", 1, max_samples, 1)
    seed = _integer(body, "seed", SEED_RANGE[0], SEED_RANGE[1] - samples, 0)
    return Settings(
        t0=float(np.float32(t0)),
        repeats=_integer(body, "repeats", 1, max_repeats, 1),
        seed=seed,
        samples=samples,
        preset=presets.check_preset(body.get("preset", presets.DEFAULT_PRESET)),
        **text_settings(body, takes_text),
    )


def check_png(data: bytes, field: str) -> bytes:
    """``data`` if it is a PNG file (the layout the job reads holds PNGs)."""
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"{field}: expected a PNG file, got {data[:8]!r}...")
    return data


def decode_images(
    config: guide_inputs.GuideInputConfig, guide_png: bytes, mask_png: bytes | None
) -> tuple[np.ndarray, np.ndarray]:
    """Guide and mask decoded by the job's own checks (no mask: all editable, as in a job)."""
    try:
        guide, mask = guide_inputs.decode_example(
            config, "upload", "", "", guide_png, mask_png or b"", b""
        )
    except guide_inputs.BadInput as e:
        raise ValueError(str(e)) from None
    return guide, np.ones(guide.shape[:2] + (1,), np.float32) if mask is None else mask


def row_id(guide_png: bytes, mask_png: bytes | None, seed: int) -> str:
    """The id of one preview (and of its saved manifest row): its noise identity."""
    digest = hashlib.sha256(guide_png + b"\0" + (mask_png or b"")).hexdigest()[:16]
    return f"studio-{digest}-s{seed}"


def make_rows(
    guide_png: bytes, mask_png: bytes | None, guide: np.ndarray, mask: np.ndarray, s: Settings
) -> list[Row]:
    """One row per sample, seeds ``s.seed + i``."""
    images = hashlib.sha256(guide.tobytes() + b"\0" + mask.tobytes()).hexdigest()
    settings = (s.preset, s.repeats, s.t0, s.prompt, s.negative_prompt, s.guidance_scale)
    rows = []
    for seed in range(s.seed, s.seed + s.samples):
        example_id = row_id(guide_png, mask_png, seed)
        rows.append(Row(example_id, seed, guide, mask, s, (images, example_id, settings, seed)))
    return rows


@dataclasses.dataclass
class Job:
    """One request's rows and, as they finish, their output PNGs."""

    id: str
    rows: list[Row]
    results: list[bytes | None]
    error: str = ""
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def finished_rows(self) -> int:
        return sum(r is not None for r in self.results)


def _micro_columns(rows: list[Row], global_batch: int) -> dict[str, np.ndarray]:
    """SDXL's micro-conditioning of the rows as a job without ``config.sdxl`` and without
    the columns gives them: sizes the guide's, crop (0, 0), the pipelines' scores."""
    size = rows[0].guide.shape[:2]  # every row of a program has the model's size
    n, defaults = global_batch, checks.SDXL_DEFAULTS

    def rows_of(value: Any) -> np.ndarray:
        value = np.asarray(value, np.float32)
        return np.tile(value, (n, 1)) if value.ndim else np.full(n, value, np.float32)

    return {
        "original_size": rows_of(size),
        "crops_coords_top_left": rows_of(defaults["crops_coords_top_left"]),
        "target_size": rows_of(size),
        "aesthetic_score": rows_of(defaults["aesthetic_score"]),
        "negative_aesthetic_score": rows_of(defaults["negative_aesthetic_score"]),
    }


class Previewer:
    """The queue, the worker that batches it into the engine, and the result cache."""

    def __init__(
        self,
        model: Any,
        *,
        per_device_batch: int = 8,
        max_queue: int = 64,
        cache_size: int = 512,
        max_jobs: int = 256,
    ):
        self.model, self.per_device_batch, self.max_queue = model, per_device_batch, max_queue
        self.takes_text = checks.takes_text(model)
        # The job's default codec (config.latent: posterior mean, max-pooled masks).
        self._codec = model.codec_with() if self.takes_text else None
        self._editors: dict[tuple[str, int, bool], tuple[engine.Editor, Any]] = {}
        self._placed = None
        self._pending: collections.deque[tuple[Job, int]] = collections.deque()
        self._cache: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._cache_size, self._max_jobs = cache_size, max_jobs
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._stopped = False
        self._worker: threading.Thread | None = None
        self.engine_calls = 0

    def _editor(self, key: tuple[str, int, bool]) -> tuple[engine.Editor, Any]:
        """The editor and step rule of a :attr:`Settings.program` key."""
        if key not in self._editors:
            preset, repeats, _ = key
            sampler, rule = presets.sampler_for(preset)
            editor = engine.Editor(
                self.model.sde, sampler, repeats, per_device_batch=self.per_device_batch
            )
            if self._placed is None:
                self._placed = editor.place_score(self.model.score_fn, self._codec)
            self._editors[key] = (editor, rule)
        return self._editors[key]

    def warm(self, names: tuple[str, ...] = tuple(presets.PRESETS), repeats: int = 1) -> None:
        """Compiles each preset's program at K = ``repeats`` now (a text model's guided
        one, the default), so no first request of a preset waits for a compile."""
        size, channels = self.model.image_size, self.model.num_channels
        blank = np.zeros((size, size, channels), np.float32)
        mask = np.ones((size, size, 1), np.float32)
        scale = checks.DEFAULT_GUIDANCE_SCALE if self.takes_text else None
        for preset in names:
            settings = Settings(0.5, repeats, 0, 1, preset, guidance_scale=scale)
            self._edit([Row("warm-up", 0, blank, mask, settings, ())])

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="studio-previews", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join()

    def submit(self, rows: list[Row]) -> Job:
        """A job for ``rows``: cached rows are filled at once, the rest queued.

        Raises:
            Busy: the queue holds ``max_queue`` rows already.
        """
        with self._lock:
            results = [self._cache_get(row.cache_key) for row in rows]
            missing = [i for i, r in enumerate(results) if r is None]
            waiting = len(self._pending)
            if missing and waiting + len(missing) > self.max_queue:
                raise Busy(
                    f"queue: {waiting} previews waiting, {len(missing)} more would pass the "
                    f"limit of {self.max_queue}; try again in a few seconds"
                )
            job = Job(f"j{next(self._ids)}", rows, results)
            self._jobs[job.id] = job
            while len(self._jobs) > self._max_jobs:
                self._jobs.popitem(last=False)
            if not missing:
                job.done.set()
            self._pending.extend((job, i) for i in missing)
            self._lock.notify_all()
        return job

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def queued_rows(self) -> int:
        with self._lock:
            return len(self._pending)

    def _cache_get(self, key: tuple) -> bytes | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _take_batch(self) -> list[tuple[Job, int]] | None:
        """Up to one global batch of queued rows sharing the first row's program."""
        with self._lock:
            while not self._pending and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return None
            first = self._pending[0]
            program = first[0].rows[first[1]].settings.program
            editor, _ = self._editor(program)
            taken, kept = [], collections.deque()
            for job, i in self._pending:
                same = job.rows[i].settings.program == program
                if same and len(taken) < editor.global_batch:
                    taken.append((job, i))
                else:
                    kept.append((job, i))
            self._pending = kept
            return taken

    def _work(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                outputs = self._edit([job.rows[i] for job, i in batch])
            except Exception as e:  # a failed batch fails its jobs, never the server
                for job, _ in batch:
                    job.error = f"{type(e).__name__}: {e}"
                    job.done.set()
                continue
            with self._lock:
                for (job, i), png in zip(batch, outputs, strict=True):
                    job.results[i] = png
                    self._cache[job.rows[i].cache_key] = png
                    if job.finished_rows == len(job.rows):
                        job.done.set()
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)

    def _cond(self, rows: list[Row], global_batch: int) -> Any:
        """The rows' text conditioning, made as the job makes a batch's: the job's
        conditioner on a full global batch (padding rows as the job's: empty prompts),
        so the text encoder sees the job's shapes; then cut to the rows."""
        pad = global_batch - len(rows)
        batch = {
            "prompt": np.array([r.settings.prompt for r in rows] + [""] * pad, object),
            "negative_prompt": np.array(
                [r.settings.negative_prompt for r in rows] + [""] * pad, object
            ),
            "guidance_scale": np.array(
                [r.settings.guidance_scale for r in rows] + [checks.DEFAULT_GUIDANCE_SCALE] * pad,
                np.float32,
            ),
        }
        if checks.takes_micro_conditioning(self.model):
            batch.update(_micro_columns(rows, global_batch))
        conditioner = text.conditioner_for(self.model, with_negative=not rows[0].settings.unguided)
        cond = conditioner.cond({**batch, **conditioner.columns(batch)})
        return jax.tree.map(lambda v: np.asarray(v)[: len(rows)], cond)

    def _edit(self, rows: list[Row]) -> list[bytes]:
        """Output PNGs of ``rows`` (one program), encoded as the job writes them."""
        editor, rule = self._editor(rows[0].settings.program)
        t0 = np.array([row.settings.t0 for row in rows], np.float32)
        batch = engine.EditBatch(
            guides=np.stack([row.guide for row in rows]),
            seeds=np.array([row.seed for row in rows], np.int32),
            id_words=rng.string_id_words([row.id for row in rows]),
            t0=t0,
            n_steps=rule.steps_for(t0),
            mask=np.stack([row.mask for row in rows]),
            cond=self._cond(rows, editor.global_batch) if self.takes_text else None,
        )
        outputs = np.asarray(editor.run(self._placed, batch))
        self.engine_calls += 1
        return [png_bytes(image, PNG_COMPRESSION) for image in outputs]
