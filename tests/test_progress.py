"""Progress counts images as they are written (and those in flight), with images/s and ETA;
rows and log lines come every ``every_s`` while work runs, never twice for one update.
Pre-flight: guides none of which has the model's size stop a job before any work."""

import io
import json
import os
import time
import uuid

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from sdedit_jax.data import guide_inputs
from sdedit_jax.jobs import checks, preflight, sinks
from sdedit_jax.jobs import run as job
from sdedit_jax.util import files, metric_log, progress
from sdedit_jax.util.config import load_config
from tests import job_cli

CONFIG_FILE = os.path.join(job_cli.REPO, "configs", "default.py")


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 100.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now["t"])
    return now


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in files.read_lines(path)]


def test_rows_count_written_images_with_in_flight_rate_and_eta(clock, capsys):
    log = f"ram://test-progress-{uuid.uuid4().hex}/throughput.p00000.jsonl"
    writer = metric_log.metric_writer(log, tensorboard_dir=None)
    with progress.Progress(100, writer, label="t0_0.50", every_s=5.0, ticker=False) as bar:
        bar.dispatched(32)
        bar.dispatched(32)  # 64 images on the devices, none written yet
        clock["t"] = 105.0
        bar.tick()  # a row although nothing was written: work runs
        bar.written(20)  # 20 images in 10 s: 2 images/s, 80 left: 40 s
        clock["t"] = 110.0
        bar.tick()
        clock["t"] = 111.0
        bar.tick()  # within every_s of the last report: nothing
        bar.dispatched(36)
        bar.written(80)
        clock["t"] = 150.0
    rows = _rows(log)  # ram:// counts as an object store: the log is published on close
    assert [(r["step"], r["images_written"], r["images_in_flight"]) for r in rows] == [
        (2, 0, 64),
        (2, 20, 44),
        (3, 100, 0),
    ]
    assert "eta_s" not in rows[0] and rows[0]["images_per_s"] == 0.0
    assert (rows[1]["images_per_s"], rows[1]["eta_s"], rows[1]["elapsed_s"]) == (2.0, 40.0, 10.0)
    assert (rows[2]["images_per_s"], rows[2]["eta_s"], rows[2]["total_images"]) == (2.0, 0, 100)
    # Not a terminal: one plain line per row, none repeated.
    assert capsys.readouterr().err.splitlines() == [
        "[t0_0.50] 0/100 images written, 64 in flight, 0 images/s, elapsed 00:05, ETA unknown",
        "[t0_0.50] 20/100 images written, 44 in flight, 2 images/s, elapsed 00:10, ETA 00:40",
        "[t0_0.50] 100/100 images written, 0 in flight, 2 images/s, elapsed 00:50, ETA 00:00",
    ]


def test_the_last_update_is_reported_once(clock, tmp_path, capsys):
    log = str(tmp_path / "throughput.jsonl")
    with progress.Progress(
        10, metric_log.metric_writer(log, None), label="x", every_s=5.0, ticker=False
    ) as bar:
        bar.add(10)
        clock["t"] += 1.0
        bar.tick()  # before every_s: nothing yet
        assert not files.exists(log)
        clock["t"] += 5.0
        bar.tick()
        clock["t"] += 1.0  # closing with the counts of that report adds nothing
    assert [(r["images_written"], r["elapsed_s"]) for r in _rows(log)] == [(10, 6.0)]
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_skipped_images_leave_the_total(clock, tmp_path):
    log = str(tmp_path / "throughput.jsonl")
    with progress.Progress(30, metric_log.metric_writer(log, None), label="x", ticker=False) as bar:
        bar.skip(20)  # e.g. settings read back from a cache
        clock["t"] += 5.0
        bar.add(10)
    assert [(r["images_written"], r["total_images"], r["images_per_s"]) for r in _rows(log)] == [
        (10, 10, 2.0)
    ]


def test_a_failing_log_names_its_file_and_never_hides_the_error_under_way(clock, tmp_path):
    (tmp_path / "file").write_text("")
    log = str(tmp_path / "file" / "throughput.jsonl")  # its folder is a file: appends fail
    with pytest.raises(OSError, match=r"\(writing .*/file/throughput\.jsonl\)$"):
        with progress.Progress(1, metric_log.metric_writer(log, None), label="x", ticker=False):
            pass
    with pytest.raises(KeyError, match="the job's own error"):
        with progress.Progress(1, metric_log.metric_writer(log, None), label="x", ticker=False):
            raise KeyError("the job's own error")
    # On the ticker thread the error is kept and raised by close, not printed and lost.
    bar = progress.Progress(1, metric_log.metric_writer(log, None), label="x", every_s=0.01)
    clock["t"] += 1.0
    deadline = time.monotonic() + 30
    while bar._error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="writing"):
        bar.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_of_images_with_eta_and_in_flight(clock, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    with progress.Progress(10, None, label="t0_0.30", every_s=5.0, ticker=False) as bar:
        bar.dispatched(8)
        clock["t"] += 4.0
        bar.written(4)  # 1 image/s, 6 left
        bar.tick()
        redraws = terminal.getvalue().split("\r")
    assert any(
        r.startswith("[t0_0.30]  40%|")
        and r.endswith("| 4/10 images written, 4 in flight, 1 images/s, elapsed 00:04, ETA 00:06")
        for r in redraws
    ), redraws
    assert "\n" not in terminal.getvalue().rstrip("\n")  # no log lines on a terminal


@pytest.mark.parametrize("png, npz", [(True, "none"), (False, "per_example"), (False, "shards")])
def test_the_sink_reports_each_example_once_its_files_are_published(tmp_path, png, npz):
    workdir = str(tmp_path / "out")
    calls = []

    def on_written(count: int) -> None:  # what is on disk when the sink reports
        present = [n for _, _, names in os.walk(workdir) for n in names if not n.startswith(".")]
        outputs = [n for n in present if n.endswith((".png", ".npz"))]
        calls.append((count, len(outputs), any(n.startswith("failures.") for n in present)))

    batch = {
        "id": np.array([b"a", b"b", b"c", b""]),
        "source": np.array([b"sa", b"sb", b"sc", b""]),
        "t0": np.full([4], 0.5, np.float32),
        "seed": np.arange(4),
        "valid": np.array([True, True, True, False]),  # the last row is padding
        "ok": np.array([True, False, True, False]),
        "error": np.array([b"", b"guide (sb): corrupt", b"", b""]),
    }
    with sinks.Sink(workdir, png=png, npz=npz, num_threads=1, on_written=on_written) as sink:
        sink.write_batch(batch, np.zeros((4, 2, 2, 3), np.float32))
    assert sum(count for count, _, _ in calls) == sink.rows_written == 3
    if npz == "shards":  # one file for the batch: its examples count with their record
        assert calls == [(3, 1, True)]
    else:  # each image once its file is on disk, the failure row with its record
        # (the writer thread may already be one file ahead when the first report runs)
        assert [count for count, _, _ in calls] == [1, 1, 1]
        assert calls[0][1] >= 1 and calls[1][1] == calls[2][1] == 2
        assert [failed for _, _, failed in calls] == [False, False, True]


def test_progress_every_s_is_checked():
    config = load_config(CONFIG_FILE)
    config.progress_every_s = 0
    message = r"^config\.progress_every_s: got 0.0; expected seconds > 0"
    with pytest.raises(job.ConfigError, match=message):
        checks.check_config(config)


def _save_guides(folder: str, count: int, size: int) -> None:
    for i in range(count):
        pixels = np.full((size, size, 3), 9, np.uint8)
        job_cli.save_png(os.path.join(folder, f"g{i:02d}.png"), pixels)


@pytest.mark.slow
def test_a_slow_job_reports_written_images_and_eta_while_it_runs(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    guides, workdir = str(tmp_path / "guides"), str(tmp_path / "work")
    _save_guides(guides, 8, job_cli.SIZE)
    write_image = sinks.Sink._write_image

    def slow_write_image(self, *args):
        time.sleep(0.3)  # a slow disk: images trickle out long after their batch was dispatched
        return write_image(self, *args)

    monkeypatch.setattr(sinks.Sink, "_write_image", slow_write_image)
    config = load_config(CONFIG_FILE)
    config.model_dir, config.input.path, config.t0s = tiny_model_dir, guides, (0.5,)
    config.sampler.steps_per_unit_time, config.per_device_batch = 10, 1  # one batch of 8
    config.output.writer_threads, config.contact_sheet = 1, False
    config.progress_every_s = every_s = 0.25
    assert config.input.image_size is None  # the size recorded in the (16 px) model folder
    assert job.run_job(config, workdir)["edited"] == 8
    with Image.open(os.path.join(workdir, "t0_0.50", "images", "g00.png")) as image:
        assert image.size == (job_cli.SIZE, job_cli.SIZE)
    rows = _rows(os.path.join(workdir, "t0_0.50", "throughput.p00000.jsonl"))
    during = [r for r in rows if 0 < r["images_written"] < 8]
    assert during and all(r["eta_s"] > 0 and r["images_per_s"] > 0 for r in during)
    assert all(r["images_written"] + r["images_in_flight"] == 8 for r in during)  # one batch
    assert (rows[-1]["images_written"], rows[-1]["images_in_flight"]) == (8, 0)
    # Bounded rate, no update twice: rows every_s apart, or (the last) with new counts.
    for before, after in zip(rows[:-1], rows[1:], strict=True):
        counts = [(r["images_written"], r["images_in_flight"]) for r in (before, after)]
        assert after["elapsed_s"] - before["elapsed_s"] >= every_s - 1e-9 or len(set(counts)) == 2
    # One log line per row, with the same count.
    lines = [line for line in capsys.readouterr().err.splitlines() if "images written" in line]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [
        r["images_written"] for r in rows
    ]
    assert all(line.startswith("[t0_0.50] ") for line in lines)


def _encoded(pixels: np.ndarray, format: str, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format, **save)
    return buffer.getvalue()


def test_header_sizes_are_the_decoded_sizes(tmp_path):
    pixels = np.zeros((4, 8, 3), np.uint8)
    turned = Image.Exif()
    turned[0x0112] = 6  # stored 4x8, shown (and decoded) 8x4
    cases = {
        "a.png": _encoded(pixels, "PNG"),
        "b.jpg": _encoded(pixels, "JPEG", exif=turned.tobytes()),
    }
    for name, data in cases.items():
        with Image.open(io.BytesIO(data)) as image:
            decoded = np.asarray(ImageOps.exif_transpose(image)).shape[:2]
        assert preflight.header_size(io.BytesIO(data)) == decoded, name
    assert preflight.header_size(io.BytesIO(cases["b.jpg"])) == (8, 4)
    for shape in ((5, 7), (5, 7, 3)):
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, np.float32))
        buffer.seek(0)
        assert preflight.header_size(buffer) == (5, 7)
    assert preflight.header_size(io.BytesIO(b"not an image")) is None


def _inputs(path: str, source: str = "folder", **fields) -> guide_inputs.GuideInputConfig:
    return guide_inputs.GuideInputConfig(source=source, path=path, image_size=(16, 16), **fields)


def _check(inputs: guide_inputs.GuideInputConfig) -> None:
    preflight.check_guide_sizes(inputs, guide_inputs.build_catalog(inputs), "my_model")


def test_only_a_sample_of_the_first_guides_all_of_another_size_stops_a_job(tmp_path):
    folder = str(tmp_path / "guides")
    _save_guides(folder, preflight.SAMPLE, 32)  # g00..g15: 32 px
    job_cli.save_png(os.path.join(folder, "zz.png"), np.zeros((16, 16, 3), np.uint8))
    with open(os.path.join(folder, "g00.png"), "wb") as f:
        f.write(b"broken")  # unreadable: its own failure row later, not part of the sample
    with pytest.raises(ValueError) as error:
        _check(_inputs(folder))
    assert str(error.value) == (
        "config.input.resize: got False, but the first 15 readable guides are 32x32 (e.g. "
        f"{folder}/g01.png) and the model (config.model_dir='my_model') takes 16x16; set "
        "--config.input.resize=True to resize them to 16x16, or use a model of their size "
        "(--config.model_dir=...)"
    )
    _check(_inputs(folder, resize=True))
    job_cli.save_png(os.path.join(folder, "g05.png"), np.zeros((16, 16, 3), np.uint8))
    _check(_inputs(folder))  # one guide of the sample fits: the others fail one by one


def test_record_sources_are_sampled_from_their_records(tmp_path):
    shard = str(tmp_path / "a.tfrecord")
    with tf.io.TFRecordWriter(shard) as writer:
        for i in range(3):
            png = _encoded(np.zeros((24, 24, 3), np.uint8), "PNG")
            writer.write(guide_inputs.tf_example(png, id=f"r{i}"))
    message = r"first 3 readable guides are 24x24 \(e.g. .*a\.tfrecord#0\)"
    with pytest.raises(ValueError, match=message):
        _check(_inputs(shard, "tfrecord"))


@pytest.mark.slow
def test_the_cli_stops_on_guides_of_another_size_before_any_work(tiny_model_dir, tmp_path):
    guides, workdir = str(tmp_path / "guides"), str(tmp_path / "work")
    _save_guides(guides, 3, 2 * job_cli.SIZE)
    # No --config.input.image_size: the size recorded in the (16 px) model folder.
    command = [
        arg
        for arg in job_cli.command(tiny_model_dir, guides, workdir, t0s="(0.5,)")
        if not arg.startswith("--config.input.image_size")
    ]
    proc = job_cli.run(command)
    assert proc.returncode == 2, proc.stderr
    assert job_cli.error_lines(proc.stderr) == [
        f"sdedit_jax: config.input.resize: got False, but the first 3 readable guides are "
        f"32x32 (e.g. {guides}/g00.png) and the model (config.model_dir={tiny_model_dir!r}) "
        "takes 16x16; set --config.input.resize=True to resize them to 16x16, or use a model "
        "of their size (--config.model_dir=...)"
    ]
    assert not os.path.exists(workdir)  # before any sub-job folder (t0_*) or other file
