"""The guide sources, one module each; ``MODULES`` is the one list of them.

A source module declares ``SOURCE``, a :class:`~sdedit_jax.data.guide_inputs.catalog.Source`:
its name (``config.input.source``), how it lists its examples, its own options block
(``config.input.<name>``, a frozen dataclass, or None) and the fields it requires.
Adding a guide source is one new module here and one entry in ``MODULES``; the
config check, the source names, the catalog dispatch and the blocks (with their
``--help`` lines, from the options' docstrings) of ``configs/default.py`` all derive
from this list.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from sdedit_jax.data.guide_inputs.catalog import Source
from sdedit_jax.data.guide_inputs.sources import folder, manifest, tfds, tfrecord

MODULES = (folder, tfrecord, tfds, manifest)


def by_name() -> dict[str, Source]:
    """Every source of ``MODULES``, by name, in list order (read when called)."""
    return {module.SOURCE.name: module.SOURCE for module in MODULES}


def _attribute_docs(options: type) -> dict[str, str]:
    """``field -> meaning`` from the ``Attributes:`` section of an options docstring."""
    docs, field = {}, None
    lines = (options.__doc__ or "").split("Attributes:", 1)[-1].splitlines()
    for line in lines:
        text = line.strip()
        name, colon, rest = text.partition(": ")
        if colon and name.isidentifier() and name in options.__dataclass_fields__:
            field, docs[name] = name, rest
        elif text and field:
            docs[field] += " " + text
    return docs


def _default(options: type, field: dataclasses.Field) -> Any:
    """A field's default as a config value (None becomes a typed placeholder)."""
    if field.default is not None:
        return field.default
    hint = typing.get_type_hints(options)[field.name]
    kind = next(a for a in typing.get_args(hint) if a is not type(None))
    return config_dict.placeholder(kind)


def option_blocks() -> dict[str, ml_collections.ConfigDict]:
    """``config.input.<source>`` of every source with options, with their defaults."""
    return {
        source.name: ml_collections.ConfigDict(
            {f.name: _default(source.options, f) for f in dataclasses.fields(source.options)}
        )
        for source in by_name().values()
        if source.options is not None
    }


def option_docs() -> dict[str, str]:
    """``input.<source>.<field>`` -> its meaning (what ``--help`` prints beside it)."""
    return {
        f"input.{source.name}.{field}": f"{doc.rstrip('.')} (source={source.name})"
        for source in by_name().values()
        if source.options is not None
        for field, doc in _attribute_docs(source.options).items()
    }
