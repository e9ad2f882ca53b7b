"""Progress of long work: a tqdm bar on stderr and the rate through a clu metric writer.

Jobs and evaluations count *finished* images (outputs or failure rows
published), not dispatched batches: steps are dispatched asynchronously and
outputs queue for the writers, so dispatched work runs ahead of what is on
disk. The bar's rate and ETA therefore come from finished images (averaged
since the start, not smoothed), and so do the scalars written every
``every_s`` seconds: ``images_written``, ``total_images``, ``elapsed_s``,
``images_per_s`` (the JSONL log and TensorBoard of :mod:`sdedit_jax.metric_log`).
Training uses the same :func:`bar`, counting steps.
"""

from __future__ import annotations

import sys
import time

import tqdm
from clu import metric_writers


class _OneLinePerRedraw:
    """tqdm redraws a bar after a carriage return; in a log file each redraw is a line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip("\n")
        if line.strip():
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, label: str, unit: str, initial: int = 0, every_s: float = 5.0) -> tqdm.tqdm:
    """The project's progress bar on stderr: redrawn in place on a terminal, one line
    every ``every_s`` in a log file; rate and ETA averaged since the start."""
    interactive = sys.stderr.isatty()
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc=f"[{label}]",
        unit=unit,
        file=sys.stderr if interactive else _OneLinePerRedraw(sys.stderr),
        smoothing=0.0,
        mininterval=0.5 if interactive else every_s,
        dynamic_ncols=interactive,
        ascii=not interactive,
    )


class Progress:
    """A progress bar plus periodic scalars; use as a context manager (closing writes the last)."""

    def __init__(
        self,
        total: int,
        writer: metric_writers.MetricWriter | None,
        *,
        label: str,
        every_s: float = 5.0,
    ):
        self.total, self.writer, self.every_s = total, writer, every_s
        self.start = self.last_write = time.perf_counter()
        self.step = self.done = 0
        self._written_done = -1
        self.bar = bar(total, label, "img", every_s=every_s)

    def update(self, step: int, done: int) -> None:
        """``step`` batches dispatched so far, ``done`` images finished so far."""
        self.step = step
        self.bar.update(done - self.done)
        self.done = done
        if time.perf_counter() - self.last_write >= self.every_s:
            self._write()

    def add(self, count: int) -> None:
        """``count`` more images finished, as one more step."""
        self.update(self.step + 1, self.done + count)

    def skip(self, count: int) -> None:
        """``count`` images need no work in this run (e.g. read from a cache): they leave
        the total, so the rate and ETA cover only the work still to do."""
        self.total -= count
        self.bar.total = self.total
        self.bar.refresh()

    def _write(self) -> None:
        now = time.perf_counter()
        self.last_write = now
        if self.writer is None or self.done == self._written_done:
            return
        self._written_done = self.done
        elapsed = now - self.start
        self.writer.write_scalars(
            self.step,
            {
                "images_written": self.done,
                "total_images": self.total,
                "elapsed_s": elapsed,
                "images_per_s": self.done / elapsed if elapsed > 0 else 0.0,
            },
        )

    def close(self) -> None:
        """Writes the final scalars and publishes the log."""
        self._write()
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
