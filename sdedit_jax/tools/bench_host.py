"""Host-side benchmarks of batch jobs (not tests): bookkeeping at scale and the output pipeline.

    # 1,000,000-example manifest on one host, trivial score function: startup,
    # resume with 99 % done, peak memory; the per-id string set side by side.
    python -m sdedit_jax.tools.bench_host --what=scale --examples=1000000
    # Listing + validating a 1,000,000-row manifest: the streamed columns against the
    # per-row catalog of an earlier commit (--baseline_rev), each in a fresh process.
    python -m sdedit_jax.tools.bench_host --what=catalog --examples=1000000
    # Decode + PNG encode + write at 256x256 (no model), by writer threads and PNG level.
    python -m sdedit_jax.tools.bench_host --what=pipeline --size=256 --images=384

Each measured phase runs in a fresh subprocess, so its peak memory (the
``ru_maxrss`` high-water mark above the process's footprint after its imports)
is its own. Figures go to stdout as JSON lines; BENCHMARKS.md records them with
the CPU they came from.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

_WHAT = flags.DEFINE_enum(
    "what", "scale", ["scale", "catalog", "pipeline", "phase"], "what to measure"
)
_EXAMPLES = flags.DEFINE_integer("examples", 1_000_000, "examples in the synthetic manifest")
_DONE = flags.DEFINE_float("done", 0.99, "fraction already finished in the resume phase")
_SIZE = flags.DEFINE_integer("size", 256, "image side of the pipeline benchmark")
_IMAGES = flags.DEFINE_integer("images", 384, "images per pipeline measurement")
_SCRATCH = flags.DEFINE_string("scratch", "", "folder for generated data (default: a temp dir)")
_PHASE = flags.DEFINE_string("phase", "", "internal: the phase a subprocess runs")
_BASELINE_REV = flags.DEFINE_string(
    "baseline_rev",
    "0b36014",
    "git commit whose input catalog (one Python object per row) is the old path",
)

GUIDE_SIDE = 16
ROWS_PER_RECORD = 1000  # rows per completion record (one written batch)


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown"
    return f"{name}, {len(os.sched_getaffinity(0))} cores usable"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- scale: synthetic data -----------------------------------------------------------------------


def _job_fields() -> dict:
    return {
        "sde": "VPSDE",
        "predictor": "euler_maruyama",
        "corrector": "none",
        "max_steps": 1,
        "steps_per_unit_time": 0,
        "n_steps": 1,
        "repeats": 1,
        "model_sha256": "0" * 64,
    }


def make_scale_data(root: str, examples: int, done: float) -> dict:
    """A manifest of ``examples`` rows and a workdir whose records finish ``done`` of them."""
    from sdedit_jax.jobs import manifest as job_manifest

    guide = os.path.join(root, "guide.png")
    Image.fromarray(np.full((GUIDE_SIDE, GUIDE_SIDE, 3), 128, np.uint8)).save(guide)
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w") as f:
        for i in range(examples):
            f.write(json.dumps({"path": "guide.png", "id": f"images/{i:08d}.png"}) + "\n")
    workdir = os.path.join(root, "work", "t0_0.50")
    os.makedirs(os.path.join(workdir, "arrays"), exist_ok=True)
    finished = int(examples * done)
    fields = _job_fields()
    for start in range(0, finished, ROWS_PER_RECORD):
        shard = f"arrays/part.p00000.r0.{start // ROWS_PER_RECORD:06d}.npz"
        with open(os.path.join(workdir, shard), "wb") as f:
            f.write(b"npz")  # only its existence is checked on resume
        rows = [
            {
                **fields,
                "id": f"images/{i:08d}.png",
                "source": guide,
                "npz": shard,
                "npz_index": i - start,
                "t0": np.float32(0.5),
                "seed": 0,
            }
            for i in range(start, min(start + ROWS_PER_RECORD, finished))
        ]
        name = f"manifest.p00000.r0.{start // ROWS_PER_RECORD:06d}.jsonl"
        with open(os.path.join(workdir, name), "w") as f:
            f.writelines(job_manifest.jsonl_line(r) for r in rows)
    return {"manifest": manifest, "workdir": workdir, "finished": finished}


# --- scale: one phase per subprocess ---------------------------------------------------------


def _trivial_editor():
    """An Editor whose score is ``-x`` (one step): the device side costs ~nothing."""
    import jax

    from sdedit_jax import engine
    from sdedit_jax.sampling.sampler import Sampler
    from sdedit_jax.sde import VPSDE

    sampler = Sampler(predictor="euler_maruyama", corrector="none", max_steps=1)
    editor = engine.Editor(VPSDE(), sampler, 1, per_device_batch=256)
    score = jax.tree_util.Partial(lambda x, t: -x)
    return editor, editor.place_score(score)


def run_phase(phase: str, data: dict) -> dict:
    """Runs one measured phase in this process; returns its timings and peak memory."""
    import jax  # noqa: F401  (imports belong to the footprint, not to the phase)
    import tensorflow as tf  # noqa: F401

    from sdedit_jax.data import guide_inputs
    from sdedit_jax.jobs import manifest as job_manifest
    from sdedit_jax.jobs import sinks

    base = _peak_mb()
    start = time.perf_counter()
    out: dict = {"phase": phase}
    if phase == "index":  # the compact completed-id index alone
        index = job_manifest.completed_index(data["workdir"])
        out.update(seconds=time.perf_counter() - start, ids=len(index))
    elif phase == "string_set":  # the per-id string set it replaces, for comparison
        ids = job_manifest.completed_ids(data["workdir"])
        out.update(seconds=time.perf_counter() - start, ids=len(ids))
    else:  # "fresh" or "resume": what a job does before and during its first batch
        config = guide_inputs.GuideInputConfig(
            source="manifest",
            path=data["manifest"],
            image_size=(GUIDE_SIDE, GUIDE_SIDE),
            t0=0.5,
        )
        catalog = guide_inputs.build_catalog(config)
        out["catalog_s"] = time.perf_counter() - start
        workdir = data["workdir"] if phase == "resume" else data["workdir"] + "_fresh"
        mark = time.perf_counter()
        completed = job_manifest.completed_index(workdir)
        out["completed_index_s"] = time.perf_counter() - mark
        editor, placed = _trivial_editor()
        mark = time.perf_counter()
        stream = guide_inputs.make_guide_dataset(
            config,
            batch_size_per_host=editor.global_batch,
            completed=completed,
            catalog=catalog,
            process_index=0,
            process_count=1,
        )
        iterator = stream.dataset.as_numpy_iterator()
        first = next(iterator)
        out["stream_and_first_batch_s"] = time.perf_counter() - mark
        out["startup_s"] = time.perf_counter() - start
        out.update(to_edit=stream.num_examples, skipped=stream.num_skipped)
        if phase == "resume":  # finish the remaining examples through the trivial model
            from sdedit_jax.jobs.stream import run_stream
            from sdedit_jax.sampling.steps import StepRule

            mark = time.perf_counter()
            with tempfile.TemporaryDirectory() as scratch:
                sink = sinks.Sink(os.path.join(scratch, "out"), png=False, npz="shards")

                def batches():
                    yield first
                    yield from iterator

                summary = run_stream(
                    editor,
                    placed,
                    batches(),
                    sink,
                    step_rule=StepRule(n_steps=1),
                )
            out["finish_rest_s"] = time.perf_counter() - mark
            out["finished_rows"] = summary.rows_done
    out["peak_mb_above_imports"] = round(_peak_mb() - base, 1)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def _old_catalog(rev: str):
    """The input catalog module as it was at ``rev`` (read with ``git show``), imported
    under another name so that old and new paths run on the same tree."""
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = subprocess.run(
        ["git", "-C", repo, "show", f"{rev}:sdedit_jax/data/guide_inputs/catalog.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "old_catalog.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_catalog", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_catalog"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_catalog_phase(phase: str, data: dict) -> dict:
    """Lists and validates the manifest with the new (streamed columns) or old catalog."""
    import jax  # noqa: F401  (imports belong to the footprint, not to the phase)
    import tensorflow as tf  # noqa: F401

    from sdedit_jax.data import guide_inputs

    build = guide_inputs.build_catalog
    if phase == "catalog_old":
        build = _old_catalog(data["baseline_rev"]).build_catalog
    config = guide_inputs.GuideInputConfig(
        source="manifest", path=data["manifest"], image_size=(GUIDE_SIDE, GUIDE_SIDE)
    )
    base, cpu, start = _peak_mb(), _cpu_seconds(), time.perf_counter()
    catalog = build(config)
    out = {
        "phase": phase,
        "manifest": os.path.basename(data["manifest"]),
        "rows": len(catalog),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu_seconds() - cpu,
        "peak_mb_above_imports": _peak_mb() - base,
        "failed_rows": int(sum(map(bool, catalog.columns["error"]))),
        "first_ids": catalog.ids[:2],
    }
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def bench_catalog(root: str) -> None:
    """Old and new catalog of two 1M-row manifests: one guide under every id (as in
    ``--what=scale``) and a distinct path per row (what real manifests hold)."""
    examples = _EXAMPLES.value
    Image.fromarray(np.full((GUIDE_SIDE, GUIDE_SIDE, 3), 128, np.uint8)).save(
        os.path.join(root, "guide.png")
    )
    manifests = {"same_path": "guide.png", "distinct_paths": "guides/{i:08d}.png"}
    for name, path in manifests.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            for i in range(examples):
                row = {"path": path.format(i=i), "id": f"images/{i:08d}.png"}
                f.write(json.dumps(row) + "\n")
    load = os.getloadavg()[0]
    print(json.dumps({"cpu": _cpu(), "examples": examples, "load_1min": load}), flush=True)
    for name in manifests:
        data = {"manifest": os.path.join(root, f"{name}.jsonl")}
        data["baseline_rev"] = _BASELINE_REV.value
        results = {p: _subprocess_phase(p, data) for p in ("catalog_old", "catalog_new")}
        for result in results.values():
            print(json.dumps(result), flush=True)
        old, new = results["catalog_old"], results["catalog_new"]
        assert old["rows"] == new["rows"] and old["first_ids"] == new["first_ids"]
        print(
            json.dumps(
                {
                    "manifest": name,
                    "old_over_new_seconds": round(old["seconds"] / new["seconds"], 1),
                    "old_over_new_cpu_seconds": round(old["cpu_seconds"] / new["cpu_seconds"], 1),
                    "old_over_new_peak_mb": round(
                        old["peak_mb_above_imports"] / new["peak_mb_above_imports"], 1
                    ),
                }
            ),
            flush=True,
        )


def _subprocess_phase(phase: str, data: dict) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "sdedit_jax.tools.bench_host",
        "--what=phase",
        f"--phase={phase}",
        f"--scratch={json.dumps(data)}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_scale(root: str) -> None:
    mark = time.perf_counter()
    data = make_scale_data(root, _EXAMPLES.value, _DONE.value)
    print(
        json.dumps(
            {
                "cpu": _cpu(),
                "examples": _EXAMPLES.value,
                "finished": data["finished"],
                "generate_s": round(time.perf_counter() - mark, 1),
            }
        ),
        flush=True,
    )
    for phase in ("fresh", "resume", "index", "string_set"):
        print(json.dumps(_subprocess_phase(phase, data)), flush=True)


# --- pipeline: decode + encode + write at 256^2, no model ---------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(label: dict, run) -> dict:
    """Runs ``run() -> images``; images/s by wall clock and CPU seconds per image."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    images = run()
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {
        **label,
        "images": images,
        "images_per_s": round(images / seconds, 1),
        "cpu_ms_per_image": round(cpu / images * 1e3, 1),
    }


def _stream(guides: str):
    from sdedit_jax.data import guide_inputs

    config = guide_inputs.GuideInputConfig(
        source="folder",
        path=guides,
        options={"folder": {"mask_dir": ""}},
        image_size=(_SIZE.value, _SIZE.value),
    )
    return guide_inputs.make_guide_dataset(
        config, batch_size_per_host=32, process_index=0, process_count=1
    ).dataset.as_numpy_iterator()


def _write(batches, out: str, threads: int, level: int) -> int:
    from sdedit_jax.jobs import sinks

    written = 0
    with sinks.Sink(out, png_compression=level, num_threads=threads, max_pending=4) as sink:
        for batch in batches:
            sink.write_batch(batch, batch["guide"])  # the "edit" is the identity
            written += int(batch["valid"].sum())
    return written


def _guide_images(folder: str, count: int) -> None:
    """Emoji-like 256^2 guides: the demo images upsampled, shifted and tinted (smooth, with
    edges, like this project's outputs)."""
    from sdedit_jax.data import images as image_files

    demo = os.path.join(os.path.dirname(__file__), "assets", "demo")
    sources = [
        Image.open(p).convert("RGB") for p in image_files.list_image_files(demo) if "masks" not in p
    ]
    side = _SIZE.value
    for i in range(count):
        big = sources[i % len(sources)].resize((side + 16, side + 16), Image.Resampling.BICUBIC)
        shift = i // len(sources) % 16
        pixels = np.asarray(big)[shift : shift + side, shift : shift + side].astype(np.int16)
        pixels = np.clip(pixels + (i * 7) % 23 - 11, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.png"))


def bench_pipeline(root: str) -> None:
    from sdedit_jax.jobs import sinks

    guides = os.path.join(root, "guides")
    os.makedirs(guides, exist_ok=True)
    _guide_images(guides, _IMAGES.value)
    side = _SIZE.value
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    smooth = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 0.9
    kinds = {
        "emoji-like": np.asarray(Image.open(os.path.join(guides, "00000.png")), np.float32) / 127.5
        - 1,
        "photo-like noise": np.clip(smooth + rng.normal(0, 0.08, smooth.shape), -1, 1),
    }
    encode = {}
    for kind, image in kinds.items():
        for level in (1, 6):
            start = time.perf_counter()
            sizes = [len(sinks.png_bytes(image.astype(np.float32), level)) for _ in range(20)]
            encode[f"{kind}, level {level}"] = {
                "ms": round((time.perf_counter() - start) / 20 * 1e3, 2),
                "kB": sizes[0] // 1000,
            }
    print(
        json.dumps({"cpu": _cpu(), "size": side, "images": _IMAGES.value, "png_encode": encode}),
        flush=True,
    )

    def decode_all() -> int:
        return sum(int(b["valid"].sum()) for b in _stream(guides))

    decode_all()  # warm-up: tracing the tf.data graph, filling the page cache
    print(json.dumps(_timed({"stage": "decode only (tf.data, autotuned)"}, decode_all)), flush=True)
    decoded = list(_stream(guides))
    for level in (1, 6):
        for threads in (1, 2, 4):
            out = os.path.join(root, f"enc_{level}_{threads}")
            print(
                json.dumps(
                    _timed(
                        {"stage": "encode + write", "png_level": level, "writer_threads": threads},
                        functools.partial(_write, decoded, out, threads, level),
                    )
                ),
                flush=True,
            )
    for threads in (1, 2, 4):
        out = os.path.join(root, f"all_{threads}")
        print(
            json.dumps(
                _timed(
                    {"stage": "decode + encode + write", "png_level": 1, "writer_threads": threads},
                    functools.partial(_write, _stream(guides), out, threads, 1),
                )
            ),
            flush=True,
        )


def main(argv: list[str]) -> None:
    del argv
    if _WHAT.value == "phase":
        run = run_catalog_phase if _PHASE.value.startswith("catalog_") else run_phase
        print(json.dumps(run(_PHASE.value, json.loads(_SCRATCH.value))))
        return
    with tempfile.TemporaryDirectory() as scratch:
        root = _SCRATCH.value or scratch
        os.makedirs(root, exist_ok=True)
        {"scale": bench_scale, "catalog": bench_catalog, "pipeline": bench_pipeline}[_WHAT.value](
            root
        )


if __name__ == "__main__":
    app.run(main)
