"""Score networks in NNX: DDPM++-style U-Net, DDPM U-Net, NCSN++.

Each module jits only its parameter initialiser (``_init_state``, seed traced, one
compile per architecture); forward passes are jitted by their callers
(``engine``, ``train``, ``pretrained``).
"""
