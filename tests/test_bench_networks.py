"""bench_networks on a tiny DDPM U-Net: same outputs as diffusers, FLOPs that add up."""

import pytest

from sdedit_jax.tools import bench_networks

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

TINY = {
    **bench_networks.PUBLISHED_UNETS["ddpm_cifar10_32"],
    "sample_size": 16,
    "block_out_channels": (32, 64, 64, 64),
}


def _taps_inside(size: int, kernel: int, stride: int, padding: int, outputs: int) -> int:
    """Kernel taps that land inside the input, summed over the outputs along one axis."""
    return sum(0 <= o * stride - padding + j < size for o in range(outputs) for j in range(kernel))


def _conv_and_dense_macs(model, x, t) -> int:
    """Multiply-adds of every Conv2d and Linear in one torch call, counted by hooks.

    Like XLA's cost analysis, taps on the zero padding do not count.
    """
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            batch, _, out_h, out_w = output.shape
            taps = [
                _taps_inside(
                    inputs[0].shape[2 + a],
                    module.kernel_size[a],
                    module.stride[a],
                    module.padding[a],
                    (out_h, out_w)[a],
                )
                for a in (0, 1)
            ]
            macs.append(
                batch
                * module.out_channels
                * module.in_channels
                // module.groups
                * taps[0]
                * taps[1]
            )
        else:
            macs.append(output.numel() * module.in_features)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.inference_mode():
        model(x, t)
    for handle in handles:
        handle.remove()
    return sum(macs)


@pytest.mark.slow
def test_tiny_network_matches_diffusers_and_counts_its_flops(tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    monkeypatch.setitem(bench_networks.PUBLISHED_UNETS, "tiny", TINY)
    result = bench_networks.bench_network("tiny", 2, str(tmp_path), ["default"], 1)
    assert result["max_abs_diff_jax_vs_torch"]["jax_default"] <= (
        1e-4 * result["torch_output_max_abs"]
    )
    torch.manual_seed(0)
    model = UNet2DModel(**TINY).eval()
    assert result["params_M"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    macs = _conv_and_dense_macs(model, torch.zeros(2, 3, 16, 16), torch.tensor([50.0, 950.0]))
    # Convolutions and dense layers are nearly all of the work; norms, activations and
    # attention add a little on top.
    flops = result["gflop_per_call (XLA cost analysis)"] * 1e9
    assert 2 * macs * 0.97 <= flops <= 2 * macs * 1.3
    assert {"jax_default", "torch_eager", "torch_channels_last"} <= set(result["seconds_per_call"])
    assert all(v > 0 for v in result["seconds_per_call"].values())
