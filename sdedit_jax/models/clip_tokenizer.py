"""CLIP's byte-level BPE tokenizer from a ``tokenizer/`` folder, as Stable Diffusion uses it.

Built with the ``tokenizers`` library the way transformers' ``CLIPTokenizer`` builds
itself (NFC, whitespace runs to one space, lower case; CLIP's split pattern; byte-level
BPE with ``</w>`` word ends; start and end tokens around each text), from the
folder's ``vocab.json`` and ``merges.txt`` and the special tokens and
``model_max_length`` of its ``tokenizer_config.json``/``special_tokens_map.json``
(SD 2.x pads with ``!``, SD 1.x with ``<|endoftext|>``). Every text becomes exactly
``max_length`` ids: longer ones are cut to ``max_length - 2`` tokens between the start
and end tokens, as ``padding="max_length", truncation=True`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdedit_jax import files

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # later ones win
_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "model_max_length": 77,
}


SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order
_FLAGS = ("lstrip", "rstrip", "single_word", "normalized")


def _content(value: Any, where: str) -> str:
    """A special token's text, given as a string or as an AddedToken dict (``{"content": ...}``)."""
    content = value.get("content") if isinstance(value, Mapping) else value
    if not isinstance(content, str) or not content:
        raise ValueError(f"{where}: got {value!r}; expected a non-empty string")
    return content


def special_tokens(folder: str) -> dict[str, Any]:
    """Special tokens (strings or AddedToken dicts) and ``model_max_length`` from the
    folder's JSON files, over CLIP's defaults."""
    values = dict(_DEFAULTS)
    for name in CONFIG_FILES:
        path = files.join(folder, name)
        if not files.exists(path):
            continue
        config = files.read_json_object(path)
        for key in SPECIAL:
            if config.get(key) is not None:
                _content(config[key], f"{path}: {key}")
                values[key] = config[key]
        length = config.get("model_max_length")
        if length is not None:
            if not isinstance(length, int) or isinstance(length, bool) or length < 2:
                raise ValueError(f"{path}: model_max_length: got {length!r}; expected an int >= 2")
            values["model_max_length"] = length
    return values


def _added_tokens(tokens: Mapping[str, Any]) -> list[Any]:
    """One special AddedToken per distinct text, with the flags of the last attribute naming
    it (a plain string: no stripping, matched before normalisation), as transformers does."""
    from tokenizers import AddedToken

    by_content = {}
    for key in SPECIAL:
        value = tokens[key]
        flags = {f: bool(value.get(f, False)) for f in _FLAGS} if isinstance(value, Mapping) else {}
        by_content[_content(value, key)] = AddedToken(_content(value, key), special=True, **flags)
    return list(by_content.values())


@dataclasses.dataclass
class CLIPTokenizer:
    """``tokenizer(texts) -> int32 [B, max_length]`` ids (see the module docstring)."""

    backend: Any  # a configured tokenizers.Tokenizer
    max_length: int
    pad_id: int

    @classmethod
    def from_folder(cls, folder: str, max_length: int | None = None) -> CLIPTokenizer:
        """From ``vocab.json`` + ``merges.txt`` (+ the optional token configs) in ``folder``;
        ``max_length`` defaults to the folder's ``model_max_length``."""
        vocab_path, merges_path = files.join(folder, VOCAB_FILE), files.join(folder, MERGES_FILE)
        for path in (vocab_path, merges_path):
            if not files.exists(path):
                raise FileNotFoundError(f"{path}: missing (a CLIP tokenizer needs it)")
        vocab = files.read_json_object(vocab_path)
        bad = next((k for k, v in vocab.items() if not isinstance(v, int) or v < 0), None)
        if bad is not None:
            raise ValueError(f"{vocab_path}: {bad!r}: got {vocab[bad]!r}; expected an id >= 0")
        merges = _read_merges(merges_path)
        tokens = special_tokens(folder)
        return cls.from_vocab(
            vocab, merges, tokens, max_length or tokens["model_max_length"], where=folder
        )

    @classmethod
    def from_vocab(
        cls,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        tokens: Mapping[str, Any],
        max_length: int,
        where: str = "tokenizer",
    ) -> CLIPTokenizer:
        """From a vocabulary, merges and special tokens (``bos/eos/unk/pad_token``)."""
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        names = {k: _content(tokens[k], k) for k in SPECIAL}
        missing = [
            names[k] for k in ("bos_token", "eos_token", "pad_token") if names[k] not in vocab
        ]
        if missing:
            raise ValueError(f"{where}: special token {missing[0]!r} is not in the vocabulary")
        backend = Tokenizer(
            BPE(
                vocab=dict(vocab),
                merges=list(merges),
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=names["unk_token"],
            )
        )
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(_added_tokens(tokens))
        bos, eos = names["bos_token"], names["eos_token"]
        backend.post_processor = processors.RobertaProcessing(
            (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False
        )
        pad_id = vocab[names["pad_token"]]
        backend.enable_truncation(max_length)
        backend.enable_padding(length=max_length, pad_id=pad_id, pad_token=names["pad_token"])
        return cls(backend=backend, max_length=max_length, pad_id=pad_id)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids ``int32 [B, max_length]`` and, per text, whether it was truncated."""
        if isinstance(texts, str):
            raise TypeError("texts: a sequence of strings, not one string")
        encodings = self.backend.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], np.int32).reshape(
            len(encodings), self.max_length
        )
        truncated = np.array([bool(e.overflowing) for e in encodings], bool)
        return ids, truncated

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts)[0]


def _read_merges(path: str) -> list[tuple[str, str]]:
    """``merges.txt``: an optional ``#version`` line, then one ``left right`` pair a line."""
    try:
        text = files.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 (byte {err.start})") from None
    merges = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: line {number}: expected two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    return merges
