"""Training checkpoints (orbax).

Training checkpoints hold the whole train state (step, params, EMA params,
optimizer state) plus JSON metadata with the data position. Because every
batch is a pure function of ``(seed, step)`` (see :mod:`sdedit_jax.train`),
the step *is* the data-iterator position; it is written out explicitly anyway
so a checkpoint can be understood without reading the training code.
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from sdedit_jax.util import files

PyTree = Any


def make_manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A manager over ``directory`` with items ``state`` (pytree) and ``meta`` (JSON)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        files.abspath(directory), options=options, item_names=("state", "meta")
    )


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, meta: dict) -> None:
    """Saves ``state`` and ``meta`` at ``step`` and waits until it is on disk.

    Waiting keeps a crash right after this call from losing the checkpoint.
    """
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    manager.wait_until_finished()


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: PyTree
) -> tuple[PyTree, dict] | None:
    """Restores the newest checkpoint into ``abstract_state``'s structure and
    shardings, or returns None when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.meta
