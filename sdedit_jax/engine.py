"""Device-parallel editing: the ``data`` mesh, the one compiled edit program, ``Editor``.

The whole edit (all repeats and steps) is one ``jax.jit`` program (the only jit
on the edit path; :mod:`sdedit_jax.jobs.stream` feeds it batches, training jits its
own step in :mod:`sdedit_jax.train`). Batch
arrays are sharded over a 1-D ``data`` mesh axis; the score model's weights are
replicated. Editing is purely data-parallel, so the program has no collectives.

Score functions are pytrees: their array leaves (model weights) are traced
arguments and everything else is static, so a new call with the same model
reuses the compiled program and weights are never baked in as constants. A latent
model's codec (:class:`sdedit_jax.edit.Codec`, its VAE) is split and placed the same way. A
plain Python function is a static leaf of its own; pass weights through
``jax.tree_util.Partial`` (see :func:`sdedit_jax.score.make_score_fn`). A conditional
score function is called ``score_fn(x, t, cond)`` with the batch's ``cond`` rows
(:class:`EditBatch`); without ``cond``, ``score_fn(x, t)``.

Bit-reproducibility: an example's output depends only on (seed, id, t0, n_steps,
guide, mask) at a given ``per_device_batch``. Score functions should multiply by
per-example reciprocals rather than divide by broadcast per-example values:
XLA rewrites ``x / broadcast(s)`` into ``x * broadcast(1 / s)`` in some
programs (e.g. single- vs multi-device) and not others, a last-bit difference.
On GPUs also set ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdedit_jax import rng
from sdedit_jax.edit import Codec, check_projection_noise, sdedit_batch
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.sampling.steps import paper_steps as paper_steps  # re-exported: engine.paper_steps
from sdedit_jax.sampling.steps import step_bucket
from sdedit_jax.sde import SDE, ScoreFn

DATA_AXIS = "data"


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every host)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


@dataclasses.dataclass(frozen=True)
class _StaticTree:
    """The hashable, non-array part of a pytree (a score function or a codec)."""

    treedef: Any
    static_leaves: tuple
    array_positions: tuple[int, ...]


def split_tree(tree: Any) -> tuple[_StaticTree, list]:
    """Splits a pytree (score function, codec) into (static part, array leaves)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    positions = tuple(i for i, leaf in enumerate(leaves) if _is_array(leaf))
    static = tuple(None if i in positions else leaf for i, leaf in enumerate(leaves))
    return _StaticTree(treedef, static, positions), [leaves[i] for i in positions]


def _merge_tree(static: _StaticTree, arrays: list) -> Any:
    leaves = list(static.static_leaves)
    for position, array in zip(static.array_positions, arrays, strict=True):
        leaves[position] = array
    return jax.tree_util.tree_unflatten(static.treedef, leaves)


class Placed(NamedTuple):
    """A score function and codec split for the edit program, weights on the mesh."""

    score: _StaticTree
    score_arrays: list
    codec: _StaticTree
    codec_arrays: list


@functools.partial(
    jax.jit,
    static_argnames=(
        "static_score",
        "static_codec",
        "sde",
        "sampler",
        "repeats",
        "projection_noise",
        "mesh",
    ),
)
def _edit_program(
    score_arrays: list[jax.Array],
    codec_arrays: list[jax.Array],
    guides: jax.Array,
    seeds: jax.Array,
    id_words: jax.Array,
    t0: jax.Array,
    n_steps: jax.Array,
    mask: jax.Array | None,
    cond: Any,
    initial_noise: jax.Array | None,
    n_repeats: jax.Array | None,
    *,
    static_score: _StaticTree,
    static_codec: _StaticTree,
    sde: SDE,
    sampler: Sampler,
    repeats: int,
    projection_noise: str,
    mesh: Mesh,
) -> jax.Array:
    """The one compiled edit: every row of one global batch, all repeats and steps.

    The rows (``guides`` ... ``n_repeats``, the fields of :class:`EditBatch`) are
    sharded over the mesh's ``data`` axis and edited per device by a ``shard_map`` of
    :func:`~sdedit_jax.edit.sdedit_batch`; the weights of the score function and of the
    codec (``score_arrays``, ``codec_arrays``) are replicated and merged back with their
    static halves on each device (a codec of ``None`` has neither). ``mask``, ``cond``
    and ``initial_noise`` may be ``None`` (a pytree without leaves); ``cond``'s leaves
    are split by rows like the images, so each example meets its own conditioning.
    Static arguments are hashable, so a new batch, new weights of the same network or
    new per-example values reuse the compiled program.

    Returns:
        ``[B, H, W, C]`` edited images, sharded like ``guides``.
    """

    def edit_local(score_arrays, codec_arrays, *rows):
        guides, seeds, id_words, t0, n_steps, mask, cond, initial_noise, n_repeats = rows
        return sdedit_batch(
            _merge_tree(static_score, score_arrays),
            sde,
            sampler,
            guides,
            rng.example_keys(seeds, id_words),
            t0,
            n_steps,
            mask,
            repeats,
            cond,
            codec=_merge_tree(static_codec, codec_arrays),
            initial_noise=initial_noise,
            projection_noise=projection_noise,
            n_repeats=n_repeats,
        )

    rows = PartitionSpec(DATA_AXIS)
    local = jax.shard_map(
        edit_local, mesh=mesh, in_specs=(PartitionSpec(),) * 2 + (rows,) * 9, out_specs=rows
    )
    return local(
        score_arrays,
        codec_arrays,
        guides,
        seeds,
        id_words,
        t0,
        n_steps,
        mask,
        cond,
        initial_noise,
        n_repeats,
    )


def compiled_program_count() -> int:
    """How many edit programs have been compiled in this process (for tests/logs)."""
    return _edit_program._cache_size()


Rows = np.ndarray | jax.Array  # host-side (numpy) or global (sharded) arrays


@dataclasses.dataclass(frozen=True)
class EditBatch:
    """One batch of edit inputs, host-side (numpy) or already global arrays.

    Every field is per example (leading axis ``B``) and is padded, cut and sharded by
    rows alike (:meth:`Editor.run`, :meth:`Editor.shard`).

    Attributes:
        guides: ``[B, H, W, C]`` float32 guide images.
        seeds: ``[B]`` int32 job seeds; with ``id_words`` they key every draw.
        id_words: ``[B, W]`` uint32 example ids (:func:`sdedit_jax.rng.ids_to_words`).
        t0: ``[B]`` float32 start times in ``(eps, T]``.
        n_steps: ``[B]`` int32 reverse steps, in ``[1, sampler.max_steps]``.
        mask: ``[B, H, W, 1 or C]`` float32, 1 = editable; ``None`` edits everything.
        cond: the score function's per-example conditioning, a pytree whose leaves all
            have the leading axis ``B`` (the score function is then called
            ``score_fn(x, t, cond)``); ``None`` for unconditional models.
        initial_noise: ``[B, h, w, c]`` noise of the perturbation to ``t0`` (in the
            codec's space); ``None`` draws it from each example's key.
        n_repeats: ``[B]`` int32 SDEdit cycles (K), in ``[1, Editor.repeats]``; ``None``:
            ``Editor.repeats`` for every row.
    """

    guides: Rows
    seeds: Rows
    id_words: Rows
    t0: Rows
    n_steps: Rows
    mask: Rows | None = None
    cond: Any = None
    initial_noise: Rows | None = None
    n_repeats: Rows | None = None

    def map_rows(self, fn: Callable[[Rows], Rows]) -> EditBatch:
        """``fn`` applied to every array of every field (``None`` fields stay ``None``)."""
        return EditBatch(
            **{f.name: jax.tree.map(fn, getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


class Editor:
    """Runs SDEdit for one (SDE, sampler, repeats, projection noise) on a device mesh.

    ``repeats`` is K for every row, or the bucket of rows' own K (``EditBatch.n_repeats``).

    The compiled step edits ``per_device_batch`` rows on every device (a
    ``shard_map``, so the per-device program is the same for any mesh size);
    longer batches run as several steps. An example is therefore always
    computed by the same program on the same number of rows, which makes its
    result bit-identical for any batch size, batch position and device count
    (at a given ``per_device_batch``): XLA's vectorisation and reduction order
    depend on the shapes a program sees. Padded rows use a valid ``t0`` and are
    cut from the result; every draw comes from the example's own key, so they
    never influence real rows.
    """

    def __init__(
        self,
        sde: SDE,
        sampler: Sampler,
        repeats: int = 1,
        mesh: Mesh | None = None,
        per_device_batch: int = 8,
        projection_noise: str = "fresh",
    ):
        check_projection_noise(projection_noise)
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats: must be a positive int, got {repeats!r}")
        if not isinstance(per_device_batch, int) or per_device_batch < 1:
            raise ValueError(f"per_device_batch: must be a positive int, got {per_device_batch!r}")
        self.sde, self.sampler, self.repeats = sde, sampler, repeats
        self.projection_noise = projection_noise
        self.per_device_batch = per_device_batch
        self.mesh = data_mesh() if mesh is None else mesh
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def global_batch(self) -> int:
        """Rows per compiled step: mesh size * per-device batch."""
        return self.num_devices * self.per_device_batch

    def place_score(self, score_fn: ScoreFn, codec: Codec | None = None) -> Placed:
        """Splits the score function (and codec) and replicates their weights (do it once)."""
        static_score, score_arrays = split_tree(score_fn)
        static_codec, codec_arrays = split_tree(codec)
        return Placed(
            static_score,
            jax.device_put(score_arrays, self.replicated),
            static_codec,
            jax.device_put(codec_arrays, self.replicated),
        )

    def run_global(self, placed: Placed, batch: EditBatch) -> jax.Array:
        """One compiled step on sharded arrays of ``global_batch`` rows."""
        return self._call(_edit_program, placed, batch)

    def lower(self, placed: Placed, batch: EditBatch) -> jax.stages.Lowered:
        """The step's lowered program (``.compile()`` it to time compilation or read costs)."""
        return self._call(_edit_program.lower, placed, batch)

    def _call(self, program, placed: Placed, batch: EditBatch):
        return program(
            placed.score_arrays,
            placed.codec_arrays,
            batch.guides,
            batch.seeds,
            batch.id_words,
            batch.t0,
            batch.n_steps,
            batch.mask,
            batch.cond,
            batch.initial_noise,
            batch.n_repeats,
            static_score=placed.score,
            static_codec=placed.codec,
            sde=self.sde,
            sampler=self.sampler,
            repeats=self.repeats,
            projection_noise=self.projection_noise,
            mesh=self.mesh,
        )

    def shard(self, batch: EditBatch) -> EditBatch:
        """Places a host batch of ``global_batch`` rows on the mesh, sharded by rows."""
        return batch.map_rows(lambda v: jax.device_put(v, self.batch_sharding))

    def run(self, placed: Placed, batch: EditBatch) -> jax.Array:
        """Edits a host batch of any size: pads, runs step by step, cuts the padding."""
        size = len(batch.t0)
        padded = _pad_batch(batch, -size % self.global_batch)
        outputs = []
        for start in range(0, size + (-size % self.global_batch), self.global_batch):
            rows = padded.map_rows(_slice_rows(start, start + self.global_batch))
            outputs.append(self.run_global(placed, self.shard(rows)))
        return jax.numpy.concatenate(outputs)[:size]


def _slice_rows(start: int, stop: int) -> Callable[[Rows], Rows]:
    return lambda v: v[start:stop]


def _pad_batch(batch: EditBatch, pad: int) -> EditBatch:
    if pad == 0:
        return batch

    def pad_rows(v, fill):
        v = np.asarray(v)
        return np.concatenate([v, np.full((pad,) + v.shape[1:], fill, v.dtype)])

    return EditBatch(
        guides=pad_rows(batch.guides, 0.0),
        seeds=pad_rows(batch.seeds, 0),
        id_words=pad_rows(batch.id_words, 0),
        t0=pad_rows(batch.t0, 1.0),
        n_steps=pad_rows(batch.n_steps, 1),
        mask=None if batch.mask is None else pad_rows(batch.mask, 1.0),
        cond=jax.tree.map(lambda v: pad_rows(v, 0), batch.cond),
        initial_noise=None if batch.initial_noise is None else pad_rows(batch.initial_noise, 0.0),
        n_repeats=None if batch.n_repeats is None else pad_rows(batch.n_repeats, 1),
    )


def _per_example(value, batch: int, dtype, field: str) -> np.ndarray:
    array = np.asarray(value, dtype)
    if array.ndim == 0:
        return np.full((batch,), array, dtype)
    if array.shape != (batch,):
        raise ValueError(f"{field}: expected a scalar or shape ({batch},), got shape {array.shape}")
    return array


def _per_example_tree(cond: Any, batch: int) -> Any:
    """``cond``'s leaves as numpy arrays, each checked to have ``batch`` rows."""
    cond = jax.tree.map(np.asarray, cond)
    for path, leaf in jax.tree_util.tree_leaves_with_path(cond):
        if leaf.ndim == 0 or leaf.shape[0] != batch:
            raise ValueError(
                f"cond{jax.tree_util.keystr(path)}: expected a leading axis of {batch} "
                f"(one row per guide), got shape {leaf.shape}"
            )
    return cond


def validate_edit_inputs(
    guides: np.ndarray, t0: np.ndarray, n_steps: np.ndarray, mask, sde: SDE, sampler: Sampler
) -> None:
    """Raises ``ValueError`` naming the offending field for unusable inputs."""
    if not np.all(np.isfinite(guides)):
        bad = sorted(set(np.nonzero(~np.isfinite(guides))[0].tolist()))
        raise ValueError(f"guides: non-finite values in examples at batch positions {bad[:10]}")
    if not np.all((t0 > sde.eps) & (t0 <= sde.T)):
        raise ValueError(
            f"t0: every value must lie in ({sde.eps}, {sde.T}] (the SDE's eps..T), got "
            f"min {t0.min():.4g} max {t0.max():.4g}"
        )
    if np.any((n_steps < 1) | (n_steps > sampler.max_steps)):
        raise ValueError(
            f"n_steps: every value must lie in [1, max_steps={sampler.max_steps}], got "
            f"min {n_steps.min()} max {n_steps.max()}"
        )
    if mask is not None:
        if mask.shape[:3] != guides.shape[:3] or mask.shape[3] not in (1, guides.shape[3]):
            raise ValueError(
                f"mask: shape {mask.shape} does not match guides {guides.shape} "
                "(expected [B, H, W, 1] or the guides' shape)"
            )
        if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask: values must be finite and in [0, 1] (1 = editable)")


def sdedit(
    score_fn: ScoreFn,
    sde: SDE,
    guides,
    *,
    seed: int = 0,
    example_ids=None,
    t0=0.5,
    mask=None,
    n_steps=250,
    max_steps: int | None = None,
    repeats=1,
    max_repeats: int | None = None,
    predictor: str = "euler_maruyama",
    corrector: str | None = None,
    time_grid: str = "",
    denoise: bool = True,
    mesh: Mesh | None = None,
    per_device_batch: int = 8,
    cond: Any = None,
    codec: Codec | None = None,
    initial_noise=None,
    projection_noise: str = "fresh",
    **solver_options: Any,
) -> jax.Array:
    """Edits ``guides`` with SDEdit on every device (one compiled program per shape).

    Args:
        score_fn: ``score_fn(x[B,H,W,C] float32, t[B]) -> score`` (with ``cond``:
            ``score_fn(x, t, cond)``); a pytree
            (e.g. ``jax.tree_util.Partial``) whose array leaves are weights.
        sde: the forward SDE the score model was trained with.
        guides: ``[B, H, W, C]`` guide images in the model's value range.
        seed: job seed; with ``example_ids`` it determines all randomness.
        example_ids: ``[B]`` non-negative integer ids (default ``0..B-1``) or
            ``[B, W]`` uint32 words. An example's output depends only on
            (seed, id, t0, n_steps, its guide and mask), never on the batch.
        t0: SDEdit start time, a float or ``[B]``; traced (no recompiles).
        mask: ``[B, H, W, 1]`` or ``[B, H, W, C]``, 1 = editable region.
        n_steps: reverse steps from ``t0`` to ``eps``, an int or ``[B]``;
            traced. The paper's N-step discretisation of [0, 1] corresponds
            to ``paper_steps(N, t0)`` (N=500, t0=0.5 -> 250).
        max_steps: the compiled step bucket (default: ``step_bucket(max(n_steps))``).
        repeats: SDEdit's K, sequential perturb-and-denoise cycles: an int or ``[B]``
            (traced within ``max_repeats``: a batch mixing K is one program).
        max_repeats: the compiled bucket of per-example K (default: ``max(repeats)``);
            given or with ``[B]`` repeats, K is traced, otherwise static.
        predictor, corrector, denoise, time_grid: see ``Sampler`` (e.g.
            ``predictor="dpm_solver_2m"``, ``time_grid="logsnr"``; "" = the solver's
            default grid).
        mesh: device mesh (default: all devices on a ``data`` axis).
        per_device_batch: rows each device edits per compiled step; results
            are bit-identical across batch sizes and device counts at a fixed value.
        cond: per-example conditioning of a conditional score model, a pytree whose
            leaves have the leading axis ``B``; the score function is then called
            ``score_fn(x, t, cond)`` with each example's own rows. ``None``: unconditional.
        codec: a latent model's autoencoder (:class:`sdedit_jax.edit.Codec`; e.g.
            ``sj.load_model(sd_folder).codec``): the SDE then runs on its latents and the
            output is decoded and pasted back in pixels. ``None``: the SDE runs on pixels.
        initial_noise: ``[B, h, w, c]`` noise of the perturbation to ``t0`` (shaped like
            the encoded guides); default: drawn from each example's key.
        projection_noise: a masked edit's known-region noise, ``"fresh"`` at every step
            or ``"initial"`` (the perturbation's own; diffusers' inpainting convention).
        **solver_options: the chosen solvers' own options, e.g. ``eta`` (ddim),
            ``snr`` and ``corrector_steps`` (langevin); see ``Sampler``.

    Returns:
        ``[B, H, W, C]`` edited images.
    """
    guides = np.asarray(guides, np.float32)
    if guides.ndim != 4:
        raise ValueError(f"guides: expected [B, H, W, C], got shape {guides.shape}")
    batch = guides.shape[0]
    t0 = _per_example(t0, batch, np.float32, "t0")
    steps = _per_example(n_steps, batch, np.int32, "n_steps")
    n_repeats, bucket = _repeats(repeats, max_repeats, batch)
    sampler = Sampler(
        predictor,
        corrector or "none",
        step_bucket(steps.max()) if max_steps is None else max_steps,
        denoise=denoise,
        time_grid=time_grid,
        **solver_options,
    )
    ids = np.arange(batch) if example_ids is None else np.asarray(example_ids)
    if len(ids) != batch:
        raise ValueError(f"example_ids: {len(ids)} ids for {batch} guides")
    if ids.ndim == 1 and (not np.issubdtype(ids.dtype, np.integer) or ids.min(initial=0) < 0):
        raise ValueError("example_ids: expected non-negative integers")
    mask = None if mask is None else np.asarray(mask, np.float32)
    validate_edit_inputs(guides, t0, steps, mask, sde, sampler)
    cond = _per_example_tree(cond, batch)
    if initial_noise is not None:
        initial_noise = _checked_initial_noise(initial_noise, guides, codec)
    editor = Editor(sde, sampler, bucket, mesh, per_device_batch, projection_noise)
    batch_in = EditBatch(
        guides=guides,
        seeds=np.full((batch,), seed, np.int32),
        id_words=np.asarray(rng.ids_to_words(ids)),
        t0=t0,
        n_steps=steps,
        mask=mask,
        cond=cond,
        initial_noise=initial_noise,
        n_repeats=n_repeats,
    )
    return editor.run(editor.place_score(score_fn, codec), batch_in)


def _repeats(repeats, max_repeats: int | None, batch: int) -> tuple[np.ndarray | None, int]:
    """(per-example K or ``None`` when static, the bucket), checked."""
    if max_repeats is None and np.ndim(repeats) == 0:
        return None, repeats  # static K: Editor checks it
    per_row = np.asarray(repeats)
    if not np.issubdtype(per_row.dtype, np.integer):
        raise ValueError(f"repeats: expected integers, got {per_row.dtype}")
    per_row = _per_example(per_row, batch, np.int32, "repeats")
    bucket = int(per_row.max()) if max_repeats is None else max_repeats
    if per_row.min() < 1 or per_row.max() > bucket:
        raise ValueError(f"repeats: must lie in [1, max_repeats = {bucket}], got {per_row}")
    return per_row, bucket


def _checked_initial_noise(noise, guides: np.ndarray, codec: Codec | None) -> np.ndarray:
    """``noise`` as float32, checked to have the encoded guides' shape and finite values."""
    noise = np.asarray(noise, np.float32)
    if codec is None:
        expected = guides.shape
    else:
        keys = jax.ShapeDtypeStruct((guides.shape[0],), jax.random.key(0).dtype)
        expected = jax.eval_shape(codec.encode, keys, guides).shape
    if noise.shape != tuple(expected):
        raise ValueError(
            f"initial_noise: shape {noise.shape}, expected {tuple(expected)} (the encoded guides)"
        )
    if not np.all(np.isfinite(noise)):
        raise ValueError("initial_noise: non-finite values")
    return noise
