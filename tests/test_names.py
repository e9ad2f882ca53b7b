"""Output names: the id -> file name map is injective on every file system; t0 folders too."""

import random
import unicodedata

import numpy as np
import pytest

from sdedit_jax.data import names
from sdedit_jax.jobs import plan

ADVERSARIAL = [
    "cat.png",
    "cat",
    "cat.jpg",
    "cat.jpg.png",
    "cat.png.png",
    "cat~.png",
    "cat~",
    "Cat.png",
    "CAT.PNG",
    "cat.PNG",
    "x",
    "x.png/y",
    "x.png",
    "x/y",
    "x.png.png/y",
    "a b",
    "a_b",
    "a_b-7dbde93504",
    "a_b~c8687a08aa5d6ed20443",
    "a_b~c8687a08aa5d6ed20443.png",
    "café.png",
    unicodedata.normalize("NFD", "café.png"),
    "cafe.png",
    "CAFÉ.png",
    "Å.png",
    "\u212b.png",  # A-ring and the Angstrom sign: NFC-equal, different code points
    ".hidden.png",
    ".x.png.sdedit-tmp-p00000-0123",
    ".tmp-p00000-x",
    "..",
    ".",
    "",
    "/",
    "//",
    "/abs.png",
    "a//b.png",
    "a/./b.png",
    "a/../b.png",
    "../../etc/passwd",
    "sub/cat.png",
    "SUB/cat.png",
    "sub/Cat.png",
    "sub.png/cat.png",
    "sub~/cat.png",
    "shard-00001.tfrecord:17",
    "mnist-test.tfrecord-00000-of-00001__0",
    "tab\there",
    "nul\0l",
    "x" * 300,
    "x" * 300 + "y",
    "é" * 200,
    "emoji \U0001f600.png",
    "con",
    "a:b",
    "a\\b",
]


def _variants(name: str) -> set[str]:
    """Spellings a case-insensitive or normalising file system treats as the same name."""
    return {
        name.casefold(),
        unicodedata.normalize("NFD", name).casefold(),
        unicodedata.normalize("NFC", name).casefold(),
    }


def _check_injective(ids: list[str]) -> None:
    outputs = [names.output_name(i) for i in ids]
    seen: dict[str, str] = {}
    for example_id, out in zip(ids, outputs, strict=True):
        for variant in _variants(out):
            assert seen.setdefault(variant, example_id) == example_id, (example_id, out)
    files = {v for out in outputs for v in _variants(out)}
    for out in outputs:
        parts = out.split("/")
        for i in range(1, len(parts)):  # no output needs another output's file as a folder
            assert "/".join(parts[:i]).casefold() not in files, out
        assert all(p and not p.startswith(".") and len(p.encode()) <= 255 for p in parts), out
        assert out.endswith(".png") and out.isascii()


def test_output_names_are_injective_over_adversarial_ids():
    _check_injective(ADVERSARIAL)


def test_output_names_are_injective_over_random_ids():
    rng = random.Random(0)
    alphabet = "aAbB.-_~/ é\u0301\u212bÅpngPNG0"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(20000)}
    ids |= {i + ".png" for i in list(ids)[:5000]}
    _check_injective(sorted(ids))


def test_readable_names_and_the_png_extension():
    assert names.output_name("sub/cat.png") == "sub/cat.png"  # no more cat.png.png
    assert names.output_name("cat.jpg") == "cat.jpg~.png"
    assert names.output_name("cat") == "cat~.png"
    assert names.output_name("IMG 1.JPG").startswith("IMG_1.JPG~")
    assert names.output_stem("sub/cat.png") == "sub/cat"
    assert names.output_name("a b") != names.output_name("a_b-7dbde93504")


def test_find_clashes_reports_later_ids_whose_names_collide(monkeypatch):
    # A deliberately non-injective rule: the check must catch what a rule gets wrong.
    monkeypatch.setattr(names, "output_name", lambda i: i.lower() + ".png")
    clashes = names.find_clashes(["A", "b", "a", "b.png/c", "B"])
    assert clashes == {"a": "A", "b.png/c": "b", "B": "b"}
    monkeypatch.undo()
    assert names.find_clashes(ADVERSARIAL) == {}


@pytest.mark.parametrize(
    "t0, folder",
    [
        (0.3, "t0_0.30"),
        (0.5, "t0_0.50"),
        (1.0, "t0_1.00"),
        (0.501, "t0_0.501"),
        (0.504, "t0_0.504"),
        (0.1 + 0.2, "t0_0.30000000000000004"),
    ],
)
def test_t0_folder_names(t0, folder):
    assert plan.t0_folder(t0) == folder


def test_t0_folders_never_collide_and_parse_back():
    rng = np.random.default_rng(0)
    t0s = [float(t) for t in rng.uniform(1e-5, 1.0, 5000)] + [0.501, 0.504, 0.5, 0.5 + 1e-12]
    folders = [plan.t0_folder(t) for t in t0s]
    assert len(set(folders)) == len(set(t0s))
    assert all(float(f.removeprefix("t0_")) == t for f, t in zip(folders, t0s, strict=True))
