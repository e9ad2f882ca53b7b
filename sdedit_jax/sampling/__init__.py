"""Reverse-time integration: solvers with per-example state, time grids and the loop.

* :mod:`solver`: the interface (``init`` -> state, ``step(state) -> state``) and the
  alpha/sigma/log-SNR helpers; :mod:`integrate`: ``Sampler`` and the loop.
* One file per solver family, each exporting ``SOLVERS`` (name -> factory):
  :mod:`classic` (Song et al.'s predictors and correctors, adapted unchanged),
  :mod:`ddim`, :mod:`dpm_solver`. A new solver is a class in its family's file plus
  its ``SOLVERS`` entry; a new family is one new file listed in ``integrate.SOLVERS``.
* :mod:`grids`: uniform, log-SNR and Karras time grids.
"""
