"""The guide sources, one module each; ``MODULES`` is the one list of them.

A source module declares ``SOURCE``, a :class:`~sdedit_jax.data.guide_inputs.catalog.Source`:
its name (``config.input.source``), how it lists its examples, its own options block
(``config.input.<name>``, a frozen dataclass, or None) and the fields it requires.
Adding a guide source is one new module here and one entry in ``MODULES``; the
config check, the source names and the catalog dispatch all derive from this list.
"""

from __future__ import annotations

from sdedit_jax.data.guide_inputs.catalog import Source
from sdedit_jax.data.guide_inputs.sources import folder, manifest, tfds, tfrecord

MODULES = (folder, tfrecord, tfds, manifest)


def by_name() -> dict[str, Source]:
    """Every source of ``MODULES``, by name, in list order (read when called)."""
    return {module.SOURCE.name: module.SOURCE for module in MODULES}
