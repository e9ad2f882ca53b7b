"""The training loop: denoising score matching, data-parallel over all devices.

Exact resume: the training split is small, so it is held in memory and the
batch of step ``k`` is a pure function of ``(seed, k)``: sample number
``j = k * B + i`` is image ``perm_e[j mod N]`` with ``e = j // N`` and
``perm_e = permutation(fold_in(order_key, e), N)``; flips and the loss's noise
come from keys folded with ``k``. Nothing but the checkpointed train state
carries over between steps, so a resumed run repeats the uninterrupted one
bit for bit.

Parallelism: the train step is one ``jax.jit`` program (:func:`shard_train_step`)
over the engine's 1-D ``data`` mesh (:func:`sdedit_jax.engine.data_mesh`) of all
devices; the batch is sharded along it and the train state is replicated, so
XLA inserts the gradient all-reduce. In-memory data also jits its batch gather
(:func:`sdedit_jax.training.train_data.make_batch`), sharded on the same mesh.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from sdedit_jax import engine, pretrained
from sdedit_jax.models import unet
from sdedit_jax.sde import SDE, sde_from_config
from sdedit_jax.training import checkpoint, losses
from sdedit_jax.training.train_data import (
    STREAMING_SOURCES,
    load_train_images,
    make_batch,
    streaming_batches,
)
from sdedit_jax.util import files, metric_log, progress

Array = jax.Array
TrainStep = Callable[["TrainState", Array, Array], tuple["TrainState", dict[str, Array]]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and thus is checkpointed).

    Attributes:
        step: number of completed steps.
        params: trainable model variables.
        constants: non-trainable model variables (e.g. Fourier frequencies).
        ema_params: exponential moving average of ``params``, used for sampling.
        opt_state: optimizer state.
    """

    step: Array
    params: nnx.State
    constants: nnx.State
    ema_params: nnx.State
    opt_state: optax.OptState


# --- configuration ---------------------------------------------------------------


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW with linear warm-up and optional cosine decay."""
    if config.schedule == "constant":
        schedule = optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1))
    elif config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0,
            config.lr,
            max(config.warmup_steps, 1),
            config.decay_steps,
            end_value=config.lr * config.final_lr_fraction,
        )
    else:
        raise ValueError(
            f"config.optim.schedule must be 'constant' or 'cosine', got {config.schedule!r}"
        )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
        ),
    )


# --- model and step ----------------------------------------------------------------


def init_state(
    config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Initialises the model from ``config.seed`` and the optimizer around it."""
    model = unet.build(config.model, config.seed)
    graphdef, params, constants = nnx.split(model, nnx.Param, ...)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        constants=constants,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
    )
    return graphdef, state


def make_train_step(
    graphdef: nnx.GraphDef,
    sde: SDE,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> TrainStep:
    """The pure update ``(state, images, key) -> (state, metrics)``.

    ``config`` is the ``training`` section merged with ``optim.ema_rate``.
    """
    parameterization = config.parameterization
    likelihood_weighting = config.likelihood_weighting
    ema_rate = config.ema_rate

    def train_step(state: TrainState, images: Array, key: Array):
        def loss_fn(params: nnx.State) -> Array:
            model = nnx.merge(graphdef, params, state.constants)
            return losses.dsm_loss(
                model,
                sde,
                images,
                key,
                parameterization=parameterization,
                condition=unet.condition(model.cfg),
                likelihood_weighting=likelihood_weighting,
                train=True,
            )

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = jax.tree.map(
            lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state.ema_params, params
        )
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def step_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The fields :func:`make_train_step` needs, gathered from the full config."""
    return ml_collections.ConfigDict(
        {
            "parameterization": config.training.parameterization,
            "likelihood_weighting": config.training.likelihood_weighting,
            "ema_rate": config.optim.ema_rate,
        }
    )


def shard_train_step(train_step: TrainStep, mesh: jax.sharding.Mesh) -> TrainStep:
    """Jits ``train_step`` over ``mesh``: state replicated (and donated), batch sharded."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(engine.DATA_AXIS))
    return jax.jit(
        train_step,
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def full_ema_state(state: TrainState) -> nnx.State:
    """EMA weights plus constants: the state of ``nnx.split(model)`` for sampling."""
    return nnx.merge_state(state.ema_params, state.constants)


# --- loop ----------------------------------------------------------------------------


def _log(writer, step: int, losses_in_window: list[float], grad_norm: float, secs: float) -> float:
    """Writes one record (TensorBoard and ``metrics.jsonl``); returns the window's mean loss."""
    record = {
        "loss": float(np.mean(losses_in_window)),
        "grad_norm": grad_norm,
        "steps_per_sec": len(losses_in_window) / secs,
    }
    writer.write_scalars(step, record)
    return record["loss"]


def _write_final_weights(
    workdir: str, config: ml_collections.ConfigDict, state: TrainState
) -> None:
    """EMA weights (fp32 + bf16) and ``model_info.json``: a model folder in ``workdir``."""
    sums = pretrained.save_model(
        workdir,
        jax.device_get(full_ema_state(state)),
        config.model.to_dict(),
        config.sde.to_dict(),
        config.training.parameterization,
        extra={"step": int(state.step)},
        with_bf16=True,
    )
    print(f"wrote EMA weights: {sums}", flush=True)


def _check_batch(
    config: ml_collections.ConfigDict, num_devices: int, num_images: int | None
) -> None:
    batch_size = config.training.batch_size
    if batch_size % num_devices:
        raise ValueError(
            f"config.training.batch_size={batch_size} is not divisible by the {num_devices} devices"
        )
    if num_images is not None and num_images < batch_size:
        raise ValueError(
            f"config.training.batch_size={batch_size} exceeds the {num_images} "
            "training images of config.data"
        )


def _restore(
    manager: ocp.CheckpointManager,
    state: TrainState,
    sharding: jax.sharding.Sharding,
    seed: int,
    workdir: str,
) -> TrainState:
    """The newest checkpoint's state if there is one (checked against ``seed``), else ``state``."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state
    )
    restored = checkpoint.restore_latest(manager, abstract)
    if restored is None:
        return state
    restored_state, meta = restored
    if meta["seed"] != seed:
        raise ValueError(f"{workdir}: checkpoint has seed {meta['seed']}, config.seed={seed}")
    print(f"resumed from step {int(restored_state.step)}", flush=True)
    return restored_state


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: list[jax.Device] | None = None,
    stop_at: int | None = None,
) -> TrainState:
    """Runs (or resumes) training until ``config.training.num_steps``.

    Args:
        config: full training config (see ``configs/train_emoji.py``).
        workdir: checkpoints, ``metrics.jsonl``, TensorBoard summaries (``tensorboard/``)
            and final weights go here.
        devices: devices of the data mesh (default: all).
        stop_at: stop (with a checkpoint) after this step, as if interrupted.

    Returns:
        The final train state (replicated on the mesh).
    """
    training = config.training
    mesh = engine.data_mesh(devices)
    streaming = config.data.source in STREAMING_SOURCES
    images_np = None if streaming else load_train_images(config.data, config.seed)
    _check_batch(config, mesh.devices.size, None if streaming else images_np.shape[0])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(engine.DATA_AXIS))
    files.makedirs(workdir)

    sde = sde_from_config(config.sde)
    tx = make_optimizer(config.optim)
    graphdef, state = init_state(config, tx)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"model: {num_params:,} params; devices: {mesh.devices.size}", flush=True)
    manager = checkpoint.make_manager(files.join(workdir, "checkpoints"), training.keep_checkpoints)
    state = _restore(manager, jax.device_put(state, replicated), replicated, config.seed, workdir)

    root = jax.random.key(config.seed)
    data_key, train_key = jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)
    step = int(state.step)
    if streaming:
        stream = streaming_batches(config.data, training.batch_size, config.seed, step)

        def get_batch(step):
            del step  # the stream is already positioned
            local = next(stream)
            return jax.make_array_from_process_local_data(batch_sharding, local)
    else:
        images = jax.device_put(images_np, replicated)
        make = jax.jit(
            functools.partial(
                make_batch, batch_size=training.batch_size, random_flip=config.data.random_flip
            ),
            out_shardings=batch_sharding,
        )

        def get_batch(step):
            return make(images, data_key, jnp.asarray(step, jnp.int32))

    step_fn = shard_train_step(make_train_step(graphdef, sde, tx, step_config(config)), mesh)

    last_step = training.num_steps if stop_at is None else min(stop_at, training.num_steps)
    window: list[float] = []
    window_start = last_save = time.perf_counter()
    writer = metric_log.training_writer(workdir)
    steps_bar = progress.bar(last_step, "train", "step", initial=step)
    while step < last_step:
        batch = get_batch(step)
        state, metrics = step_fn(state, batch, jax.random.fold_in(train_key, step))
        # Synchronous steps: simulated CPU devices can deadlock with many programs in flight.
        jax.block_until_ready(state)
        step += 1
        steps_bar.update(1)
        window.append(float(metrics["loss"]))
        if step % training.log_every == 0 or step == last_step:
            now = time.perf_counter()
            loss = _log(writer, step, window, float(metrics["grad_norm"]), now - window_start)
            steps_bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            window, window_start = [], now
        if (
            step % training.ckpt_every_steps == 0
            or time.perf_counter() - last_save >= training.ckpt_every_secs
            or step == last_step
        ):
            meta = {"step": step, "seed": config.seed, "data_position": step * training.batch_size}
            checkpoint.save(manager, step, state, meta)
            last_save = time.perf_counter()
    steps_bar.close()
    writer.close()
    if step == training.num_steps:
        _write_final_weights(workdir, config, state)
    manager.close()
    return state
