"""Command line: build an image-compositing guide in the job's input layout.

    python -m sdedit_jax.composite --source cat.png --target room.png \
        --box 40,30,200,180 --at 60,80 --scale 0.5 --dilate 4 --out guides/ --name cat_room

writes ``guides/cat_room.png`` and ``guides/masks/cat_room.png``. The region is
given by ``--source_mask`` (same size as the source, white = region) or
``--box x0,y0,x1,y1`` (source pixels, x = column, ends exclusive); ``--at x,y``
places the top-left corner of the region's (scaled) bounding box in the target.
See :mod:`sdedit_jax.data.compositing` for the rules. A bad argument (an image
of more than 2^26 pixels in its header, a region that --scale makes larger than
the target, an --out that is a file, ...) exits with status 2 and one line naming
the argument, file and value; nothing is written.
"""

from __future__ import annotations

import os
import sys

from sdedit_jax.util import quiet

tf = quiet.import_tensorflow()  # before anything else imports it

from absl import app, flags  # noqa: E402

from sdedit_jax.data.compositing import (  # noqa: E402
    CompositeError,
    box_region,
    paste,
    read_mask,
    read_rgb,
    write_guide,
)
from sdedit_jax.util import cli  # noqa: E402


def _ints(text: str, count: int, field: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise CompositeError(f"{field}: expected {count} comma-separated integers, got {text!r}")
    return values


_SOURCE = flags.DEFINE_string("source", None, "image to take the region from")
_TARGET = flags.DEFINE_string("target", None, "image to paste into (sets the guide's size)")
_SOURCE_MASK = flags.DEFINE_string("source_mask", None, "mask of the region (white = region)")
_BOX = flags.DEFINE_string("box", None, "region box x0,y0,x1,y1 in source pixels (end exclusive)")
_AT = flags.DEFINE_string("at", "0,0", "x,y of the target where the region's top-left lands")
_SCALE = flags.DEFINE_float("scale", 1.0, "resize factor of the region")
_DILATE = flags.DEFINE_integer("dilate", 0, "grow the written mask by this many pixels")
_OUT = flags.DEFINE_string("out", None, "output folder (job input layout)")
_NAME = flags.DEFINE_string("name", None, "guide name (file stem)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing guide of that name")


def run() -> tuple[str, str]:
    """Reads the flags, builds the composite and writes it; returns the written paths."""
    for flag in (_SOURCE, _TARGET, _OUT, _NAME):
        if not flag.value:
            raise CompositeError(f"--{flag.name}: required")
    if (_SOURCE_MASK.value is None) == (_BOX.value is None):
        raise CompositeError("--source_mask / --box: give exactly one of them")
    source = read_rgb(_SOURCE.value, "--source")
    target = read_rgb(_TARGET.value, "--target")
    if _BOX.value is not None:
        region = box_region(source.shape, _ints(_BOX.value, 4, "--box"))
    else:
        region = read_mask(_SOURCE_MASK.value, "--source_mask")
    at = _ints(_AT.value, 2, "--at")
    guide, mask = paste(source, region, target, at, _SCALE.value, _DILATE.value)
    existing = os.path.join(_OUT.value, _NAME.value + ".png")
    if os.path.exists(existing) and not _OVERWRITE.value:
        raise CompositeError(f"--name: {existing} exists (pass --overwrite to replace it)")
    return write_guide(_OUT.value, _NAME.value, guide, mask)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.end(cli.EXIT_CONFIG, f"error: unexpected arguments: {argv[1:]}", sys.stderr)
    quiet.quiet_logs()
    try:
        guide_path, mask_path = run()
    except CompositeError as e:
        cli.end(cli.EXIT_CONFIG, f"error: {e}", sys.stderr)
    cli.end(0, f"wrote {guide_path} and {mask_path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(__doc__, prefix="error"))
