"""The one list of network families (:class:`~sdedit_jax.models.architecture.Architecture`).

A model folder's ``architecture`` field is a key of :data:`ARCHITECTURES`; a new family
is its module (exporting ``ARCHITECTURE``) and one entry here.
"""

from __future__ import annotations

from sdedit_jax.models import ddpm_unet, ncsnpp, sd_unet, unet
from sdedit_jax.models.architecture import Architecture

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (unet.ARCHITECTURE, ddpm_unet.ARCHITECTURE, ncsnpp.ARCHITECTURE, sd_unet.ARCHITECTURE)
}
