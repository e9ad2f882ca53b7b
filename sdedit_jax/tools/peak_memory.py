"""Peak host memory of converting a latent model and of a job's startup, per folder byte.

    python -m sdedit_jax.tools.peak_memory --what=convert --source=downloads/sdxl \
        --out=models/sdxl_bf16 --bf16
    python -m sdedit_jax.tools.peak_memory --what=startup --model_dir=models/sdxl_bf16

Each figure is the process's peak resident memory (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` once jax, the project and the XLA client are loaded) minus
its resident memory at that moment, divided by the model folder's size on disk.
``convert`` is :func:`sdedit_jax.convert.convert` (the read-back check included);
``startup`` is what a job does before it compiles anything: load the model and place
its weights and codec on the device mesh (:meth:`sdedit_jax.engine.Editor.place_score`).
Measure with one device: simulated CPU devices (``XLA_FLAGS``) each hold a replica in
host memory. Prints one JSON line.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from sdedit_jax import convert, engine, pretrained
from sdedit_jax.sampling.sampler import sampler_config, sampler_from_config

_WHAT = flags.DEFINE_enum("what", "startup", ["convert", "startup"], "what to measure")
_SOURCE = flags.DEFINE_string("source", None, "convert: the diffusers folder to convert")
_OUT = flags.DEFINE_string("out", None, "convert: the model folder to write")
_BF16 = flags.DEFINE_bool("bf16", False, "convert: write bfloat16 weights")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "startup: the converted model folder")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Resets the kernel's peak-RSS mark to the current RSS; returns that RSS in bytes."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    """The peak RSS since the last :func:`reset_peak`, in bytes."""
    return _status_kib("VmHWM") * 1024


def folder_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )


def startup(model_dir: str) -> None:
    """A job's startup: the model loaded and its weights placed on the mesh."""
    model = pretrained.load_model(model_dir)
    sampler, _ = sampler_from_config(sampler_config())
    editor = engine.Editor(model.sde, sampler)
    codec = getattr(model, "codec", None)
    placed = editor.place_score(model.score_fn, codec)
    jax.block_until_ready((placed.score_arrays, placed.codec_arrays))


def measure(what: str) -> dict:
    jax.devices()  # the XLA client is part of the baseline, as the imports are
    baseline = reset_peak()
    if what == "convert":
        convert.convert(_SOURCE.value, _OUT.value, with_bf16=_BF16.value)
        folder = _OUT.value
    else:
        startup(_MODEL_DIR.value)
        folder = _MODEL_DIR.value
    size = folder_bytes(folder)
    above = peak_bytes() - baseline
    return {
        "what": what,
        "folder_bytes": size,
        "baseline_rss_bytes": baseline,
        "peak_above_baseline_bytes": above,
        "ratio": round(above / size, 3),
    }


def main(argv: list[str]) -> None:
    del argv
    needed = {"convert": (_SOURCE, _OUT), "startup": (_MODEL_DIR,)}[_WHAT.value]
    for flag in needed:
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required for --what={_WHAT.value}")
    print(json.dumps(measure(_WHAT.value)))


if __name__ == "__main__":
    app.run(main)
