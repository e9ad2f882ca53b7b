"""``initialise.build``: the jitted initialiser draws what the plain constructor draws."""

import jax
import numpy as np
import pytest
from flax import nnx

from sdedit_jax.models import ddpm_unet, initialise, ncsnpp, unet

TINY = {
    "unet": (unet, unet.UNetConfig(image_size=8, nf=8, ch_mult=(1, 2), attn_resolutions=(4,))),
    "ddpm_unet": (
        ddpm_unet,
        ddpm_unet.DDPMUNetConfig(
            image_size=8,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_attention=(False, True),
            up_attention=(True, False),
            norm_num_groups=8,
        ),
    ),
    "ncsnpp": (
        ncsnpp,
        ncsnpp.NCSNppConfig(
            image_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)
        ),
    ),
}


def _leaves(model: nnx.Module) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


@pytest.mark.parametrize("name", sorted(TINY))
def test_build_draws_what_the_eager_constructor_draws(name):
    module, config = TINY[name]
    cls = type(nnx.eval_shape(lambda: module.build(config, 0)))
    built = _leaves(module.build(config, 5))
    eager = _leaves(cls(config, rngs=nnx.Rngs(params=jax.random.key(5, impl="rbg"))))
    assert built.keys() == eager.keys()
    for path, value in eager.items():
        np.testing.assert_array_equal(built[path], value, err_msg=path)
    other = _leaves(module.build(config, 6))
    assert any(not np.array_equal(other[p], v) for p, v in built.items())


def test_one_compiled_initialiser_per_architecture():
    module, config = TINY["unet"]
    module.build(config, 1)
    before = initialise._init_state._cache_size()
    module.build(config, 2)
    module.build(config, 3)
    assert initialise._init_state._cache_size() == before
