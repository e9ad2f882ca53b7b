"""The torch-free checkpoint reader and the EfficientNet-Lite0 port with real weights."""

import collections
import io
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import skimage.data
import skimage.transform

from sdedit_jax.importers import torch_pickle
from sdedit_jax.metrics import efficientnet, realism

# ImageNet-1k class indices the photo checks rely on.
CAT_CLASSES = {
    281: "tabby cat",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
}
COFFEE_CLASSES = {504: "coffee mug", 967: "espresso", 968: "cup"}


# --- a minimal torch-format writer (stand-in torch modules, no torch needed) ----------


class _Storage:
    def __init__(self, key, data):
        self.key, self.data = key, np.ascontiguousarray(data)


class _Tensor:
    def __init__(self, storage, offset, shape, strides):
        self.args = (storage, offset, shape, strides)

    def __reduce__(self):
        return _fake_rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


def _fake_rebuild_tensor_v2(*args):
    raise AssertionError("only pickled, never called")


_fake_rebuild_tensor_v2.__module__ = "torch._utils"
_fake_rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
_STORAGE_CLASSES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
}


@pytest.fixture
def fake_torch(monkeypatch):
    """Registers stand-in torch modules so pickle can name torch's globals."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    utils._rebuild_tensor_v2 = _fake_rebuild_tensor_v2
    torch._utils = utils
    classes = {}
    for name in _STORAGE_CLASSES.values():
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        classes[name] = cls
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return classes


def _pickle_with_storages(obj, classes, legacy):
    class Pickler(pickle.Pickler):
        def persistent_id(self, value):
            if not isinstance(value, _Storage):
                return None
            cls = classes[_STORAGE_CLASSES[value.data.dtype]]
            pid = ("storage", cls, value.key, "cpu", value.data.size)
            return pid + (None,) if legacy else pid

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _write_legacy(path, obj, storages, classes):
    with open(path, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
        f.write(_pickle_with_storages(obj, classes, legacy=True))
        pickle.dump([s.key for s in storages], f, protocol=2)
        for storage in storages:
            f.write(np.int64(storage.data.size).tobytes())
            f.write(storage.data.tobytes())


def _write_zip(path, obj, storages, classes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ckpt/data.pkl", _pickle_with_storages(obj, classes, legacy=False))
        archive.writestr("ckpt/byteorder", "little")
        for storage in storages:
            archive.writestr(f"ckpt/data/{storage.key}", storage.data.tobytes())


def _example_checkpoint():
    shared = _Storage("0", np.arange(20, dtype=np.float32))
    longs = _Storage("1", np.array([7, -3], dtype=np.int64))
    doubles = _Storage("2", np.linspace(0, 1, 6))
    state = collections.OrderedDict(
        # A transposed (column-major) 3x4 view starting at element 2 of the storage.
        transposed=_Tensor(shared, 2, (3, 4), (1, 3)),
        # A second tensor sharing the storage: its last 4 elements as a 2x2 matrix.
        tail=_Tensor(shared, 16, (2, 2), (2, 1)),
        scalar=_Tensor(longs, 1, (), ()),
        doubles=_Tensor(doubles, 0, (6,), (1,)),
    )
    expected = {
        "transposed": np.arange(2, 14, dtype=np.float32).reshape(4, 3).T,
        "tail": np.array([[16, 17], [18, 19]], dtype=np.float32),
        "scalar": np.array(-3, dtype=np.int64),
        "doubles": np.linspace(0, 1, 6),
    }
    return state, [shared, longs, doubles], expected


@pytest.mark.parametrize("writer", [_write_legacy, _write_zip], ids=["legacy", "zip"])
def test_reader_rebuilds_strided_tensors(tmp_path, fake_torch, writer):
    state, storages, expected = _example_checkpoint()
    path = tmp_path / "ckpt.pth"
    writer(path, state, storages, fake_torch)
    loaded = torch_pickle.load_state_dict(path)
    assert list(loaded) == list(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
        assert loaded[name].flags.c_contiguous


class _Sneaky:
    def __reduce__(self):
        return os.path.join, ("not", "allowed")


@pytest.mark.parametrize("writer", [_write_legacy, _write_zip], ids=["legacy", "zip"])
def test_reader_refuses_non_allowlisted_globals(tmp_path, fake_torch, writer):
    path = tmp_path / "evil.pth"
    writer(path, {"weight": _Sneaky()}, [], fake_torch)
    with pytest.raises(torch_pickle.CheckpointError, match=r"refusing to load global '.*join'"):
        torch_pickle.load_checkpoint(path)


def test_pickled_attribute_edits_cannot_reach_later_loads(tmp_path, fake_torch):
    # Hand-written pickle: GLOBAL torch.FloatStorage, then BUILD {"dtype": 1} on it.
    edit = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."
    hostile = tmp_path / "hostile.pth"
    with open(hostile, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
        f.write(edit)
        pickle.dump([], f, protocol=2)
    torch_pickle.load_checkpoint(hostile)
    state, storages, expected = _example_checkpoint()
    path = tmp_path / "ckpt.pth"
    _write_legacy(path, state, storages, fake_torch)
    np.testing.assert_array_equal(torch_pickle.load_state_dict(path)["tail"], expected["tail"])


def test_reader_rejects_truncated_and_foreign_files(tmp_path, fake_torch):
    state, storages, _ = _example_checkpoint()
    path = tmp_path / "ckpt.pth"
    _write_legacy(path, state, storages, fake_torch)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(torch_pickle.CheckpointError, match="storage 2 is truncated"):
        torch_pickle.load_checkpoint(path)
    foreign = tmp_path / "foreign.pth"
    foreign.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(torch_pickle.CheckpointError, match="bad magic number"):
        torch_pickle.load_checkpoint(foreign)


# --- the pretrained network ---------------------------------------------------------


@pytest.fixture(scope="module")
def extractor():
    return efficientnet.EfficientNetFeatures.pretrained()


def _center_square(image, size=efficientnet.IMAGE_SIZE):
    h, w, _ = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    return skimage.transform.resize(crop, (size, size), anti_aliasing=True).astype(np.float32)


def test_checkpoint_contents():
    state = torch_pickle.load_state_dict(efficientnet.default_weights_path())
    assert len(state) == 296  # 16 blocks + stem/head/classifier, incl. BN counters
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)


def _softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@pytest.mark.slow
def test_photos_get_the_right_imagenet_classes(extractor):
    photos = np.stack(
        [_center_square(skimage.data.chelsea()), _center_square(skimage.data.coffee())]
    )
    probs = _softmax(extractor.logits(photos))
    cat, coffee = probs
    assert int(np.argmax(cat)) in CAT_CLASSES, np.argsort(-cat)[:5]
    assert int(np.argmax(coffee)) in COFFEE_CLASSES, np.argsort(-coffee)[:5]
    assert cat[list(CAT_CLASSES)].sum() > 0.5
    assert coffee[list(COFFEE_CLASSES)].sum() > 0.5

    features = np.asarray(extractor(photos))
    assert features.shape == (2, efficientnet.FEATURE_DIM)
    assert np.all(np.isfinite(features))
    # Averages of ReLU6 outputs must lie in [0, 6].
    assert features.min() >= 0.0 and features.max() <= 6.0


def test_extractor_protocol_and_input_checks(extractor):
    assert isinstance(extractor, realism.FeatureExtractor)
    assert (extractor.name, extractor.dim) == ("efficientnet_lite0", 1280)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        extractor(np.zeros((2, 224, 224), np.float32))


def test_mismatched_checkpoint_is_rejected(tmp_path, fake_torch):
    state, storages, _ = _example_checkpoint()
    path = tmp_path / "not_effnet.pth"
    _write_zip(path, state, storages, fake_torch)
    with pytest.raises(ValueError, match=r"not_effnet.pth: missing tensor '_conv_stem.weight'"):
        efficientnet.load_efficientnet_lite0(path)
