"""The FID Inception-v3 port against an independent PyTorch reference with random weights.

The reference below is written from the published architecture (torchvision's
Inception-v3 with pytorch-fid's FID patches), not from the Flax code. Saving its
state dict with ``torch.save`` and loading that file into the port checks the
architecture, the key mapping and the preprocessing at once.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from sdedit_jax.metrics import inception, realism

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class TorchConvUnit(nn.Module):
    """conv (no bias) -> BatchNorm(eps=0.001) -> ReLU, keyed ``conv.*`` and ``bn.*``."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TorchMixedA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = TorchConvUnit(cin, 64, 1)
        self.branch5x5_1 = TorchConvUnit(cin, 48, 1)
        self.branch5x5_2 = TorchConvUnit(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = TorchConvUnit(cin, 64, 1)
        self.branch3x3dbl_2 = TorchConvUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchConvUnit(96, 96, 3, padding=1)
        self.branch_pool = TorchConvUnit(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], dim=1)


class TorchMixedB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchConvUnit(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = TorchConvUnit(cin, 64, 1)
        self.branch3x3dbl_2 = TorchConvUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchConvUnit(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], dim=1)


class TorchMixedC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TorchConvUnit(cin, 192, 1)
        self.branch7x7_1 = TorchConvUnit(cin, c7, 1)
        self.branch7x7_2 = TorchConvUnit(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = TorchConvUnit(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TorchConvUnit(cin, c7, 1)
        self.branch7x7dbl_2 = TorchConvUnit(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TorchConvUnit(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TorchConvUnit(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TorchConvUnit(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = TorchConvUnit(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_3(self.branch7x7dbl_2(c))
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(c))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], dim=1)


class TorchMixedD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TorchConvUnit(cin, 192, 1)
        self.branch3x3_2 = TorchConvUnit(192, 320, 3, stride=2)
        self.branch7x7x3_1 = TorchConvUnit(cin, 192, 1)
        self.branch7x7x3_2 = TorchConvUnit(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchConvUnit(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchConvUnit(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], dim=1)


class TorchMixedE(nn.Module):
    """``pool`` is ``"avg"`` (FIDInceptionE_1, Mixed_7b) or ``"max"`` (E_2, Mixed_7c)."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = TorchConvUnit(cin, 320, 1)
        self.branch3x3_1 = TorchConvUnit(cin, 384, 1)
        self.branch3x3_2a = TorchConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchConvUnit(cin, 448, 1)
        self.branch3x3dbl_2 = TorchConvUnit(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = TorchConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = TorchConvUnit(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        h = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], dim=1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], dim=1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = _avg3(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], dim=1)


class TorchFIDInception(nn.Module):
    """pytorch-fid's network up to pool3 plus the 1008-way fc, on [0, 1] NCHW images."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchConvUnit(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = TorchConvUnit(32, 32, 3)
        self.Conv2d_2b_3x3 = TorchConvUnit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = TorchConvUnit(64, 80, 1)
        self.Conv2d_4a_3x3 = TorchConvUnit(80, 192, 3)
        self.Mixed_5b = TorchMixedA(192, 32)
        self.Mixed_5c = TorchMixedA(256, 64)
        self.Mixed_5d = TorchMixedA(288, 64)
        self.Mixed_6a = TorchMixedB(288)
        self.Mixed_6b = TorchMixedC(768, 128)
        self.Mixed_6c = TorchMixedC(768, 160)
        self.Mixed_6d = TorchMixedC(768, 160)
        self.Mixed_6e = TorchMixedC(768, 192)
        self.Mixed_7a = TorchMixedD(768)
        self.Mixed_7b = TorchMixedE(1280, "avg")
        self.Mixed_7c = TorchMixedE(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        features = x.mean(dim=(2, 3))
        return features, self.fc(features)


def _randomize(model, seed):
    """He-scaled conv weights and random BN statistics, so every layer matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0.0, 0.2, generator=gen)
                module.running_mean.normal_(0.0, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 2048**-0.5, generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The random-weight torch reference and its state dict saved with ``torch.save``."""
    model = _randomize(TorchFIDInception(), seed=0)
    path = tmp_path_factory.mktemp("inception") / "fid_inception.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def numpy_state(reference):
    model, _ = reference
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_features_match_torch_reference(reference):
    model, path = reference
    rng = np.random.default_rng(1)
    # Small odd-sized inputs: the upsampling to 299x299 is part of what is compared.
    images = rng.uniform(size=(2, 45, 61, 3)).astype(np.float32)
    with torch.no_grad():
        want_features, want_logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    extractor = realism.load_feature_extractor("inception_v3", path)
    assert isinstance(extractor, realism.FeatureExtractor)
    assert (extractor.name, extractor.dim) == ("inception_v3", 2048)
    features = np.asarray(extractor(images))
    logits = np.asarray(extractor.logits(images))
    want_features, want_logits = want_features.numpy(), want_logits.numpy()
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    # Guard against a degenerate reference (all-zero or exploding activations).
    assert 0.05 < want_features.std() < 100.0
    scale = np.abs(want_features).max()
    # Observed float32 differences are ~1e-6 of the scale; a wrong BN epsilon gives ~1e-2.
    np.testing.assert_allclose(features, want_features, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(
        logits, want_logits, rtol=1e-5, atol=1e-5 * np.abs(want_logits).max()
    )
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        extractor(images[..., :2])


@pytest.mark.parametrize("size", [(45, 61), (331, 317)], ids=["upsample", "downsample"])
def test_preprocess_matches_pytorch_fid_resize(size):
    images = np.random.default_rng(2).uniform(size=(1, *size, 3)).astype(np.float32)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    want = 2 * F.interpolate(nchw, size=(299, 299), mode="bilinear", align_corners=False) - 1
    got = np.asarray(inception.preprocess(images))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=2e-6)


@pytest.mark.slow
def test_npz_and_pth_give_the_same_weights(reference, numpy_state, tmp_path):
    _, path = reference
    npz_path = tmp_path / "fid_inception.npz"
    np.savez(npz_path, **numpy_state)
    from_pth = inception.load_fid_inception_v3(path)
    from_npz = inception.load_fid_inception_v3(npz_path)
    kernel = np.asarray(from_npz.Mixed_6b.branch7x7_2.conv.kernel.get_value())
    # torch [out, in, 1, 7] -> flax [1, 7, in, out]
    np.testing.assert_array_equal(
        kernel, numpy_state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        np.asarray(from_pth.Mixed_7c.branch_pool.bn.var.get_value()),
        numpy_state["Mixed_7c.branch_pool.bn.running_var"],
    )
    for a, b in zip(
        jax.tree.leaves(nnx.state(from_pth)), jax.tree.leaves(nnx.state(from_npz)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda state: state.pop("Mixed_6e.branch7x7dbl_4.bn.running_mean"),
            r"bad.npz: missing tensor 'Mixed_6e.branch7x7dbl_4.bn.running_mean'",
        ),
        (
            lambda state: state.update(
                {"Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 7, 1), np.float32)}
            ),
            r"bad.npz: tensor 'Mixed_6b.branch7x7_2.conv.weight' has shape \(128, 128, 7, 1\), "
            r"expected \(128, 128, 1, 7\)",
        ),
        (
            lambda state: state.update({"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}),
            r"bad.npz: unexpected tensors \['AuxLogits.fc.weight'\]",
        ),
        (
            lambda state: state.update({"fc.bias": np.zeros(1008, np.int64)}),
            r"bad.npz: tensor 'fc.bias' has dtype int64",
        ),
    ],
    ids=["missing", "shape", "unexpected", "dtype"],
)
@pytest.mark.slow
def test_bad_npz_weights_name_file_and_key(numpy_state, tmp_path, edit, message):
    state = dict(numpy_state)
    edit(state)
    path = tmp_path / "bad.npz"
    np.savez(path, **state)
    with pytest.raises(ValueError, match=message):
        inception.load_fid_inception_v3(path)


def test_unreadable_npz_names_the_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"garbage.npz: not a readable .npz"):
        inception.load_fid_inception_v3(path)


def test_bad_pth_weights_name_file_and_key(reference, tmp_path):
    model, _ = reference
    state = model.state_dict()
    del state["Conv2d_1a_3x3.conv.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"bad.pth: missing tensor 'Conv2d_1a_3x3.conv.weight'"):
        realism.load_feature_extractor("inception_v3", path)


def test_inception_needs_an_existing_weights_file(tmp_path):
    with pytest.raises(ValueError, match="needs weights_path"):
        realism.load_feature_extractor("inception_v3")
    with pytest.raises(FileNotFoundError, match=r"nowhere.pth: FID Inception-v3 weights file"):
        realism.load_feature_extractor("inception_v3", tmp_path / "nowhere.pth")
