"""Reverse-time integration: solvers with per-example state, time grids and the loop.

* :mod:`solver`: the interface (``init`` -> state, ``step(state) -> state``) and the
  alpha/sigma/log-SNR helpers; :mod:`integrate`: the loop.
* One file per solver family, each exporting ``SOLVERS`` (name -> factory):
  :mod:`classic` (Song et al.'s predictors and correctors, adapted unchanged),
  :mod:`ddim`, :mod:`dpm_solver`; :mod:`correctors`. A solver is a frozen dataclass
  whose own settings are its fields (:func:`solver.option`). A new solver is a class in
  its family's file plus its ``SOLVERS`` entry; a new family is one new file listed in
  ``sampler.SOLVERS``.
* :mod:`sampler`: ``Sampler`` (the solvers and their options, its one description for
  fingerprints and manifests) and ``sampler_from_config``.
* :mod:`grids`: uniform, log-SNR and Karras time grids.
"""
