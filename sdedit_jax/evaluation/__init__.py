"""Realism versus faithfulness over t0: SDEdit's trade-off curve, from a config file.

    python -m sdedit_jax.evaluate --config configs/eval_emoji.py --workdir runs/eval_emoji
    python -m sdedit_jax.evaluate --config configs/eval_tiny.py --config.model_dir=/m --workdir /w

SDEdit's start time t0 trades faithfulness (how close the output stays to the
guide) against realism (how much the output looks like real data). This
module measures the curve: guides are synthesised from held-out real images
(``tasks``: stroke paintings, stroke edits, composites; see
:mod:`sdedit_jax.data.guide_inputs`), edited at every ``t0`` of ``t0s`` with
every sampler variant, and each setting is scored by

* faithfulness to the guide: SDEdit's L2 (Euclidean norm of the pixel
  difference in ``[0, 1]``), MSE, PSNR, SSIM, and for masked tasks the L2
  inside and outside the mask (outside must stay ~0);
* realism: KID (mean and std over random subsets) and FID between
  EfficientNet-Lite0 features of the outputs and of a reference set of real
  images (features cached in ``<workdir>/reference_features.npz``).

A ``t0 = 0`` row per task scores the guides themselves (perfectly faithful,
least realistic): the baseline every curve starts from.

All ``t0`` of a variant run in ONE compiled program: ``t0`` and the paper's
step count ``ceil(N * t0)`` are traced per-example values, and every task
always passes a mask (all ones when nothing is masked), so the program's
signature never changes. Results are deterministic given the config: an
output depends only on (seed, task, example id, t0, guide, mask), and KID
draws its subsets from ``seed``; the same subsets serve every setting, so
settings are compared on paired samples.

Outputs in ``workdir``: ``results.json`` (config, model, rows), ``results.csv``
(one row per setting), ``realism_faithfulness.png`` (KID and FID against L2,
points labelled by t0), ``contact_<task>_<variant>.png`` (guide | outputs per
t0) and ``throughput.jsonl``. In the JSON, non-finite values are ``null``: an
inapplicable score (``l2_outside`` of an unmasked task) or the guides' own PSNR,
which is infinite. ``seconds`` and ``images_per_s`` time the editing only; the
first t0 of each variant includes compiling its program. Evaluation runs in
one process (on all its local devices).

Modules: :mod:`.inputs` (tasks' guides, reference images, variants, t0s),
:mod:`.scoring` (faithfulness and realism of one setting; FID/KID helpers live
in :mod:`sdedit_jax.metrics.realism`), :mod:`.report` (tables, plot, contact
sheets), :mod:`.sweep` (the resumable sweep and ``run_evaluation``). The
command line is :mod:`sdedit_jax.evaluate`.
"""

from sdedit_jax.evaluation import inputs, report, scoring, sweep
from sdedit_jax.evaluation.sweep import run_evaluation

__all__ = ["inputs", "report", "run_evaluation", "scoring", "sweep"]
