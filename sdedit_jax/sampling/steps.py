"""How many reverse steps an example gets: the paper's rule, a fixed count, the compiled bucket.

Step counts are traced per example, so one compiled program (its ``max_steps``
bucket) serves every t0; this module holds the host-side rule that picks them.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def step_bucket(n_steps: int) -> int:
    """The default ``max_steps`` for a step count: the next power of two.

    Step counts inside one bucket share a compiled program.
    """
    return 1 << max(0, int(n_steps) - 1).bit_length()


def paper_steps(total_steps: int, t0) -> np.ndarray:
    """SDEdit's step count for start time ``t0`` when [0, 1] has ``total_steps`` steps."""
    # Round first: float32 t0 (0.8 -> 0.80000001) must not add a step.
    exact = np.round(total_steps * np.asarray(t0, np.float64), 3)
    return np.maximum(1, np.ceil(exact)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class StepRule:
    """Per-example reverse step counts: the paper's N steps on [0, 1], or a fixed count.

    Set exactly one of ``steps_per_unit_time`` (an example starting at t0 gets
    ``ceil(N * t0)`` steps, capped at ``max_steps``) and ``n_steps`` (every
    example gets that many). ``max_steps`` is the compiled bucket; 0 picks
    :func:`step_bucket` of the larger of the two.
    """

    steps_per_unit_time: int = 0
    n_steps: int = 0
    max_steps: int = 0

    def __post_init__(self):
        per_unit, fixed = self.steps_per_unit_time, self.n_steps
        if (per_unit > 0) == (fixed > 0):
            raise ValueError(
                "sampler: set exactly one of steps_per_unit_time (the paper's N) and n_steps, "
                f"got steps_per_unit_time={per_unit}, n_steps={fixed}"
            )
        if not self.max_steps:
            object.__setattr__(self, "max_steps", step_bucket(max(per_unit, fixed)))
        if fixed > self.max_steps:
            raise ValueError(f"sampler: n_steps={fixed} exceeds max_steps={self.max_steps}")

    def steps_for(self, t0) -> np.ndarray:
        """int32 step counts with ``t0``'s shape."""
        if self.steps_per_unit_time > 0:
            return np.minimum(paper_steps(self.steps_per_unit_time, t0), self.max_steps)
        return np.full(np.shape(t0), self.n_steps, np.int32)
