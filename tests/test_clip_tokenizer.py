"""The CLIP tokenizer against transformers' CLIPTokenizer of the same folder.

The test writes a small byte-level BPE vocabulary and merges in SD's published
``tokenizer/`` layout (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``) and
compares ids on 240 varied prompts (case, Unicode forms, scripts, emoji, whitespace,
punctuation, special tokens in the text, empty and over-long ones).
"""

from __future__ import annotations

import numpy as np
import pytest

from sdedit_jax.latent import tokenizer as clip_tokenizer
from tests import sd_reference

pytest.importorskip("tokenizers")


@pytest.mark.parametrize("layout", ["published", "tokenizer_json"])
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_ids_match_transformers(tmp_path, pad_token, layout):
    """Published folders (``vocab.json`` + ``merges.txt``) and what transformers 5 saves
    (``tokenizer.json``, whose special tokens record how they are matched)."""
    transformers = pytest.importorskip("transformers")
    folder = str(tmp_path / "published")
    sd_reference.write_tokenizer(folder, pad_token)
    if layout == "tokenizer_json":
        resaved = str(tmp_path / "resaved")
        transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(resaved)
        assert not (tmp_path / "resaved" / "vocab.json").exists()
        folder = resaved
    texts = sd_reference.varied_texts()
    assert len(texts) >= 200
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    expected = reference(texts, padding="max_length", max_length=77, truncation=True).input_ids
    tokenizer = clip_tokenizer.CLIPTokenizer.from_folder(folder)
    ids, truncated = tokenizer.encode(texts)
    assert ids.shape == (len(texts), 77) and ids.dtype == np.int32
    mismatched = [t for t, a, b in zip(texts, ids.tolist(), expected, strict=True) if a != b]
    assert not mismatched, f"{len(mismatched)} texts differ, first {mismatched[0]!r}"
    assert tokenizer.pad_id == reference.pad_token_id
    # Truncated exactly when the untruncated ids do not fit; the vocabulary's merges are used.
    full = reference(texts).input_ids
    np.testing.assert_array_equal(truncated, [len(f) > 77 for f in full])
    assert 0 < truncated.sum() < len(texts)
    assert len(np.unique(ids)) > 200


def test_missing_file_and_bad_merges_are_one_line_errors(tmp_path):
    sd_reference.write_tokenizer(str(tmp_path))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges.txt: line 2: expected two tokens"):
        clip_tokenizer.CLIPTokenizer.from_folder(str(tmp_path))
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no vocab.json \+ merges.txt nor tokenizer.json"):
        clip_tokenizer.CLIPTokenizer.from_folder(str(tmp_path))


def test_max_length_comes_from_the_folder(tmp_path):
    sd_reference.write_tokenizer(str(tmp_path))
    config = (tmp_path / "tokenizer_config.json").read_text().replace('": 77', '": 16')
    (tmp_path / "tokenizer_config.json").write_text(config)
    tokenizer = clip_tokenizer.CLIPTokenizer.from_folder(str(tmp_path))
    ids, truncated = tokenizer.encode(["a red barn", "a " * 40])
    assert ids.shape == (2, 16) and truncated.tolist() == [False, True]
    assert ids[0, 0] == ids[1, 0] != ids[0, 1]  # the start token, then text
