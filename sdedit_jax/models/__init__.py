"""Score networks in NNX: DDPM++-style U-Net, DDPM U-Net, NCSN++.

Each module's ``build(config, seed)`` jits only the parameter initialiser
(:mod:`~sdedit_jax.models.initialise`: seed traced, one compile per architecture);
forward passes are jitted by their callers (``engine``, ``train``, ``pretrained``).
"""
