"""Latent text-to-image models (Stable Diffusion 1.x / 2.x) as SDEdit sees them.

A latent model is a score model on the latents of an autoencoder, conditioned on text:
:mod:`.codec` wraps the VAE as the edit's codec (:class:`sdedit_jax.edit.Codec`),
:mod:`.guidance` makes classifier-free guidance one batched network call,
:mod:`.tokenizer` is CLIP's BPE tokenizer, and :mod:`.model` loads the whole model
(:class:`~.model.LatentModel`) from a diffusers folder, a single-file checkpoint or a
converted model folder, and writes the latter.
"""
