"""Guide inputs of a batch edit job: sources, validation, host sharding, padding, resume.

Sources (``GuideInputConfig.source``; one module each in :mod:`.sources`, whose
options are the source's own block, ``config.input.<source>``):

* ``"folder"``: every file under ``path`` (recursively) is one example; ids are
  the POSIX paths relative to ``path`` (``"sub/cat.png"``). Guides are
  ``.png``, ``.jpg``, ``.jpeg`` (8-bit), ``.npy`` (float ``[H, W]`` or
  ``[H, W, C]`` in ``[-1, 1]``) or ``.npz`` (such an array under the key ``"image"``:
  a job's float outputs, ``arrays/<stem>.npz``, read exactly, not re-quantised).
  **Mask pairing rule:** if the folder
  ``path/<folder.mask_dir>`` (default ``masks/``) exists, every guide ``sub/cat.<ext>``
  needs exactly one mask ``<mask_dir>/sub/cat.png`` or ``<mask_dir>/sub/cat.npy``;
  without that folder no guide has a mask. Hidden files and folders (``.x``)
  are ignored; any other file with an unsupported extension, a guide without
  its mask, and a mask without a guide are reported as failures.
* ``"tfrecord"``: ``path`` is a comma-separated list of globs of TFRecord shards
  of ``tf.train.Example`` with features ``image`` (bytes: PNG/JPEG/npy
  encoded, required), ``mask`` (bytes, optional), ``id`` (bytes, default
  ``"<shard name>:<record index>"``), ``t0`` (float, optional), ``seed``
  (int64, optional); other features are ignored.
  :func:`sdedit_jax.data.records.tf_example` writes them.
* ``"tfds"``: a prepared TFDS data set (``tfds.name``, ``tfds.split``,
  ``tfds.data_dir``; never downloaded), images from ``tfds.image_key`` and
  optional masks from ``tfds.mask_key``; ids are TFDS's stable ``tfds_id``.
* ``"manifest"``: ``path`` is a ``.jsonl`` file (one JSON object per line) or a
  ``.csv`` file (header row) with fields ``path`` (required), ``mask``, ``t0``,
  ``seed``, ``id`` (default: ``path`` as written), text (below). Relative paths are resolved
  against the manifest's folder. Unknown fields fail the row (a typo such as
  ``tO`` must not silently fall back to the default). One bad line (not UTF-8,
  not JSON, nested too deep to parse, an integer past Python's 4300-digit
  limit, a lone surrogate such as ``"\\ud800"`` in a text field) fails only
  that row, named ``<manifest file>:<line>`` when it has no readable id. Rows
  are validated in a stream into columns (a million rows: about 3 s and
  160-240 MB per host, see BENCHMARKS.md).

Text (models that take prompts; :mod:`.text`): manifest fields ``prompt``,
``negative_prompt``, ``guidance_scale`` and folder captions ``<name>.txt`` beside
their guides, else the job's ``config.prompt`` etc.; with a model that takes no
text, a row naming one fails.

Micro-conditioning (SDXL models; :mod:`.micro`): manifest fields ``original_size``,
``crops_coords_top_left``, ``target_size`` (``"H,W"`` or ``[H, W]``),
``aesthetic_score``, ``negative_aesthetic_score``, else the job's ``config.sdxl``
(sizes None: the guides' size); a row naming one its model does not read fails.

``generator`` (``"stroke_painting"``, ``"stroke_edit"`` or ``"composite"``,
see :mod:`sdedit_jax.data.guides`) turns each decoded image into a synthetic
guide; it is how evaluation builds guides from held-out images. Its
randomness depends only on the example's (seed, id). ``stroke_edit`` and
``composite`` replace any source mask with their own; the donor of
``composite`` is the next example of the source in canonical order (the last
uses the first), so it too is independent of sharding and resume.

The t0 rule (``T0_ROWS``): an example whose input names its own ``t0`` (the
``t0`` field of a manifest row or TFRecord) is edited exactly once, at that
t0; a job puts all such examples in one sub-job (``t0_per_example/``). Every
other example is edited once per configured t0 (``t0_<t0>/``). So no output
is ever duplicated across t0 folders.

Canonical order and sharding: examples are listed in a canonical order (sorted
ids for folders and manifests; sorted shard names then record order for
TFRecords; TFDS's file order) that every host computes identically. Example
``i`` belongs to host ``i % process_count``; the assignment is made before
completed examples are skipped, so an example always stays with the same host
and a host's remaining work depends only on its own finished outputs.

Validation: no bad input aborts the job and none is dropped. Every example
flows through the pipeline with ``ok`` and ``error`` columns; ``error`` names
the field and file, e.g. ``"mask (/data/masks/a.png): size 31x32 does not
match guide 32x32"``. Failed rows carry a zero guide, a zero mask and the
default ``t0``, so they are harmless if the engine computes them anyway.
Rules: grayscale is replicated to RGB, palette images are expanded, RGBA is
accepted only if fully opaque; two-channel (gray+alpha) and 16-bit images
(including 16-bit PNGs, which PIL would silently truncate) fail. Images are
turned upright by their EXIF orientation tag, as viewers show them. Masks are
grayscale (RGB masks must have equal channels), 255 (or 1.0) = editable, soft
values allowed; an 8-bit mask holding only the values 0 and 1 is read as a
binary {0, 1} mask (1 = editable), since 1/255 is no meaningful soft value.
Seeds (config, manifest, record) must lie in [0, 2^31). File names that are
not valid UTF-8, FIFOs and other non-regular files (checked before anything is
opened, and opened without blocking), broken symbolic links and links to a
folder already listed (a folder above them, or one the tree or another link
lists: every real folder is listed once, so link cycles and ladders of links
end) fail; links to other folders are followed;
a CSV header that repeats a column or a JSON row that repeats a key fails its
rows. ``.npy`` headers are checked (shape, size, file length) before reading.
Every id's output name (:mod:`sdedit_jax.data.names`) must be distinct; a
clash fails the later id. A mask whose size differs from its guide
always fails; a guide whose size differs from ``image_size`` fails unless
``resize`` is set. Images over ``max_pixels``, non-finite or out-of-range
``.npy`` values, and ``t0`` outside the model's ``(eps, T]`` (``time_domain``) fail.

Batches: every host yields exactly :attr:`GuideStream.num_steps` batches of
``batch_size_per_host`` rows; rows past a host's last example are padding
with ``valid = False``. Resume: ids in ``completed`` are skipped before
batching, so a restarted job does no repeated work (batch composition
changes, outputs do not: they depend only on (seed, id)).

Modules: :mod:`.options` (``GuideInputConfig`` and the limits), :mod:`.catalog`
(what every source's listing shares: rows, columns, id rules), :mod:`.sources`
(one module per source and the one list of them; :mod:`.sources.manifest` parses
and validates manifest rows in a stream into columns), :mod:`.decode` (decoding
and validation of one example), :mod:`.pipeline` (the catalog of the configured
source and the tf.data stream). The names below are the public API, re-exported
here so ``guide_inputs.make_guide_dataset(...)`` works.
"""

from sdedit_jax.data.guide_inputs import micro, text
from sdedit_jax.data.guide_inputs.catalog import SEED_RANGE, Catalog, Source
from sdedit_jax.data.guide_inputs.decode import BadInput, decode_example
from sdedit_jax.data.guide_inputs.options import (
    GENERATOR_NAMES,
    SOURCES,
    T0_ROWS,
    GuideInputConfig,
    moved_fields,
)
from sdedit_jax.data.guide_inputs.pipeline import (
    GuideStream,
    build_catalog,
    global_num_steps,
    make_guide_dataset,
    preview_examples,
)
from sdedit_jax.data.guide_inputs.sources.folder import GUIDE_EXTENSIONS, MASK_EXTENSIONS
from sdedit_jax.data.guide_inputs.sources.manifest import MANIFEST_FIELDS
from sdedit_jax.data.guide_inputs.text import TextInputs
from sdedit_jax.data.records import tf_example

__all__ = [
    "GENERATOR_NAMES",
    "GUIDE_EXTENSIONS",
    "MANIFEST_FIELDS",
    "MASK_EXTENSIONS",
    "SEED_RANGE",
    "SOURCES",
    "T0_ROWS",
    "BadInput",
    "Catalog",
    "GuideInputConfig",
    "GuideStream",
    "Source",
    "TextInputs",
    "build_catalog",
    "decode_example",
    "global_num_steps",
    "make_guide_dataset",
    "micro",
    "moved_fields",
    "preview_examples",
    "text",
    "tf_example",
]
