"""The studio: a local web page to paint guides and masks, preview edits, save a job's inputs.

``python -m sdedit_jax.studio`` (:mod:`.__main__`) serves the page (:mod:`.server`,
``static/``). Previews run in the engine's one compiled program per (solver preset,
K), micro-batched across requests (:mod:`.previews`), for pixel models and Stable
Diffusion 1.x/2.x and SDXL (per-row prompts); "save to dataset" writes the guide, mask and a
manifest row that ``python -m sdedit_jax.main`` edits to the same
bytes (:mod:`.dataset`). Presets are :mod:`.presets`.
"""
