"""CLIP's byte-level BPE tokenizer from a ``tokenizer/`` folder, as Stable Diffusion uses it.

Built with the ``tokenizers`` library the way transformers' ``CLIPTokenizer`` builds
itself (NFC, whitespace runs to one space, lower case; CLIP's split pattern; byte-level
BPE with ``</w>`` word ends; start and end tokens around each text), from the
folder's ``vocab.json`` and ``merges.txt`` (published folders) or the vocabulary and
merges inside ``tokenizer.json`` (what transformers 5 saves), and the special tokens and
``model_max_length`` of its ``tokenizer_config.json``/``special_tokens_map.json``
(SD 2.x pads with ``!``, SD 1.x with ``<|endoftext|>``). Every text becomes exactly
``max_length`` ids: longer ones are cut to ``max_length - 2`` tokens between the start
and end tokens, as ``padding="max_length", truncation=True`` does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdedit_jax.util import files

VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE = "vocab.json", "merges.txt", "tokenizer.json"
MAX_FILE_BYTES = 64 << 20  # CLIP's vocab.json is ~1 MB, its tokenizer.json ~2 MB
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
            if not isinstance(length, int) or isinstance(length, bool) or not 2 <= length <= 4096:
                raise ValueError(
                    f"{path}: model_max_length: got {length!r}; expected an int in [2, 4096] "
                    "(CLIP's is 77)"
                )
            values["model_max_length"] = length
    return values


def _added_tokens(tokens: Mapping[str, Any], recorded: Sequence[Mapping[str, Any]]) -> list[Any]:
    """One special AddedToken per distinct text, with the flags of the last attribute naming
    it (a plain string: no stripping, matched before normalisation), as transformers does;
    flags ``recorded`` in a ``tokenizer.json`` win (they are what transformers had)."""
    from tokenizers import AddedToken

    def flags(value: Any) -> dict[str, bool]:
        return {f: bool(value.get(f, False)) for f in _FLAGS} if isinstance(value, Mapping) else {}

    by_content = {_content(tokens[k], k): flags(tokens[k]) for k in SPECIAL}
    by_content.update({_content(t, "tokenizer.json: added_tokens"): flags(t) for t in recorded})
    return [AddedToken(text, special=True, **f) for text, f in by_content.items()]


@dataclasses.dataclass
class CLIPTokenizer:
    """``tokenizer(texts) -> int32 [B, max_length]`` ids (see the module docstring)."""

    backend: Any  # a configured tokenizers.Tokenizer
    max_length: int
    pad_id: int

    @classmethod
    def from_folder(cls, folder: str, max_length: int | None = None) -> CLIPTokenizer:
        """From the files of ``folder`` (see the module docstring); ``max_length`` defaults
        to the folder's ``model_max_length``."""
        vocab, merges, recorded = vocab_and_merges(folder)
        tokens = special_tokens(folder)
        length = max_length or tokens["model_max_length"]
        return cls.from_vocab(vocab, merges, tokens, length, recorded, where=folder)

    @classmethod
    def from_vocab(
        cls,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        tokens: Mapping[str, Any],
        max_length: int,
        recorded: Sequence[Mapping[str, Any]] = (),
        where: str = "tokenizer",
    ) -> CLIPTokenizer:
        """From a vocabulary, merges, special tokens (``bos/eos/unk/pad_token``) and the
        ``added_tokens`` a ``tokenizer.json`` records."""
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
        backend.add_special_tokens(_added_tokens(tokens, recorded))
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


def vocab_and_merges(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """The BPE vocabulary and merges (``vocab.json`` + ``merges.txt``, else ``tokenizer.json``,
    whose ``added_tokens`` come third)."""
    vocab_path, merges_path = files.join(folder, VOCAB_FILE), files.join(folder, MERGES_FILE)
    if files.exists(vocab_path) and files.exists(merges_path):
        return _checked_vocab(_read_json(vocab_path), vocab_path), _read_merges(merges_path), []
    path = files.join(folder, TOKENIZER_FILE)
    if not files.exists(path):
        raise FileNotFoundError(
            f"{folder}: no {VOCAB_FILE} + {MERGES_FILE} nor {TOKENIZER_FILE} (a CLIP tokenizer "
            "needs them)"
        )
    data = _read_json(path)
    model = data.get("model")
    if not isinstance(model, Mapping) or model.get("type") != "BPE":
        raise ValueError(f"{path}: model: expected a BPE model")
    vocab = _checked_vocab(model.get("vocab"), f"{path}: model.vocab")
    merges = model.get("merges")
    if not isinstance(merges, list):
        raise ValueError(f"{path}: model.merges: expected a list")
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    bad = next((i for i, p in enumerate(pairs) if not _is_pair(p)), None)
    if bad is not None:
        raise ValueError(f"{path}: model.merges[{bad}]: got {merges[bad]!r}; expected two tokens")
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, Mapping) for t in added):
        raise ValueError(f"{path}: added_tokens: expected a list of objects")
    return vocab, [(a, b) for a, b in pairs], [t for t in added if t.get("special", True)]


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _checked_vocab(vocab: Any, where: str) -> dict[str, int]:
    if not isinstance(vocab, dict):
        raise ValueError(f"{where}: expected an object of token ids")
    bad = next((k for k, v in vocab.items() if not isinstance(v, int) or v < 0), None)
    if bad is not None:
        raise ValueError(f"{where}: {bad!r}: got {vocab[bad]!r}; expected an id >= 0")
    return vocab


def _read_json(path: str) -> dict:
    """A JSON object of up to :data:`MAX_FILE_BYTES`; any problem is one ``ValueError``."""
    if files.size(path) > MAX_FILE_BYTES:
        raise ValueError(f"{path}: more than {MAX_FILE_BYTES} bytes")
    try:
        value = json.loads(files.read_bytes(path).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 (byte {err.start})") from None
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


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
