"""score_sde (yang-song/score_sde, Flax) NCSN++ checkpoints -> :mod:`sdedit_jax.models.ncsnpp`.

A score_sde checkpoint ``checkpoint_<n>`` is the flax msgpack of its training
``State`` (fields ``step, optimizer, lr, model_state, ema_rate, params_ema, rng``);
the weights to sample with are ``params_ema``. It is read with
``flax.serialization.msgpack_restore``, which decodes data only (no pickle).
The network's hyper-parameters and the SDE are not in the file: they come from
the score_sde config, given as a named preset of a published run
(:data:`PRESETS`) or a JSON file of the same ``{"model", "data", "sampling"}``
sections.

Parameter names are those flax linen gives the modules of score_sde's
``NCSNpp`` in creation order (``ResnetBlockBigGANpp_<i>``, ``AttnBlockpp_<i>``,
``Combine_<i>``, and top-level ``Conv_<i>``/``GroupNorm_<i>`` for the input conv
and the output pyramid). Old checkpoints store GroupNorm ``scale``/``bias`` as
``(1, 1, 1, C)``; both shapes are accepted.
"""

from __future__ import annotations

import ast
import copy
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx, serialization

from sdedit_jax.importers import diffusers_ncsnpp, state_dict
from sdedit_jax.importers.imported import Imported
from sdedit_jax.models import ncsnpp
from sdedit_jax.models.ncsnpp import NCSNppConfig
from sdedit_jax.util import files

FORMAT = "score_sde"
OPTIONS = ("config",)
_CHECKPOINT = re.compile(r"checkpoint_(\d+)$")
STATE_FIELDS = ("step", "optimizer", "lr", "model_state", "ema_rate", "params_ema", "rng")

# score_sde model fields with one supported value in this port.
_REQUIRED = {
    "name": "ncsnpp",
    "conditional": True,
    "fir": True,
    "resblock_type": "biggan",
    "progressive": "output_skip",
    "progressive_input": "input_skip",
    "progressive_combine": "sum",
    "attention_type": "ddpm",
    "embedding_type": "fourier",
    "nonlinearity": "swish",
    "normalization": "GroupNorm",
    "conv_size": 3,
}
# Fields that do not change the network: SDE/training settings, and resamp_with_conv,
# which BigGAN blocks never read (their resampling is FIR without a conv).
_NOT_NETWORK = {
    "sigma_min",
    "sigma_max",
    "num_scales",
    "beta_min",
    "beta_max",
    "ema_rate",
    "resamp_with_conv",
}
_NETWORK = {
    "nf",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "fir_kernel",
    "skip_rescale",
    "fourier_scale",
    "init_scale",
    "scale_by_sigma",
}
_DATA = ("image_size", "num_channels", "centered")  # the rest of "data" is about the dataset


def _lsun_256(**model: Any) -> dict[str, dict[str, Any]]:
    """score_sde's ``configs/ve/*_ncsnpp_continuous.py`` for the 256 px runs."""
    return {
        "model": {
            "name": "ncsnpp",
            "sigma_min": 0.01,
            "sigma_max": 378.0,
            "num_scales": 2000,
            "scale_by_sigma": True,
            "ema_rate": 0.999,
            "normalization": "GroupNorm",
            "nonlinearity": "swish",
            "nf": 128,
            "ch_mult": [1, 1, 2, 2, 2, 2, 2],
            "num_res_blocks": 2,
            "attn_resolutions": [16],
            "resamp_with_conv": True,
            "conditional": True,
            "fir": True,
            "fir_kernel": [1, 3, 3, 1],
            "skip_rescale": True,
            "resblock_type": "biggan",
            "progressive": "output_skip",
            "progressive_input": "input_skip",
            "progressive_combine": "sum",
            "attention_type": "ddpm",
            "init_scale": 0.0,
            "fourier_scale": 16,
            "conv_size": 3,
            "dropout": 0.0,
            "embedding_type": "fourier",
            **model,
        },
        "data": {"image_size": 256, "num_channels": 3, "centered": False},
        "sampling": {
            "method": "pc",
            "predictor": "reverse_diffusion",
            "corrector": "langevin",
            "snr": 0.075,
            "n_steps_each": 1,
            "noise_removal": True,
        },
    }


# The published VE NCSN++ runs (checkpoints in score_sde's release, and on the hub as
# google/ncsnpp-{church,bedroom,celebahq,ffhq}-256).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "church": _lsun_256(sigma_max=380.0),
    "bedroom": _lsun_256(sigma_max=378.0),
    "celebahq_256": _lsun_256(sigma_max=348.0),
    "ffhq_256": _lsun_256(sigma_max=348.0),
}


def _sections(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    if "model" not in cfg:
        raise ValueError("score_sde config: missing section 'model'")
    return dict(cfg["model"]), dict(cfg.get("data", {}))


def config_from_score_sde(cfg: Mapping[str, Any]) -> NCSNppConfig:
    """An :class:`NCSNppConfig` from a score_sde config (``{"model": ..., "data": ...}``).

    Fields the port does not reproduce raise a one-line error naming field and value.
    """
    model, data = _sections(cfg)
    unknown = sorted(set(model) - (set(_REQUIRED) | _NOT_NETWORK | _NETWORK))
    if unknown:
        raise ValueError(
            f"score_sde config: unknown field model.{unknown[0]}={model[unknown[0]]!r}"
        )
    for field, expected in _REQUIRED.items():
        if field not in model:
            raise ValueError(f"score_sde config: missing field model.{field} (needs {expected!r})")
        value = model[field]
        if (value.lower() if isinstance(value, str) else value) != (
            expected.lower() if isinstance(expected, str) else expected
        ):
            raise ValueError(
                f"score_sde config: model.{field}={value!r} is not supported "
                f"by the NCSN++ port (needs {expected!r})"
            )
    missing = sorted((_NETWORK - {"init_scale", "dropout"}) - set(model))
    if missing:
        raise ValueError(f"score_sde config: missing field model.{missing[0]}")
    centered = bool(data.get("centered", False))
    return NCSNppConfig(
        image_size=int(data.get("image_size", 256)),
        num_channels=int(data.get("num_channels", 3)),
        nf=int(model["nf"]),
        ch_mult=tuple(int(m) for m in model["ch_mult"]),
        num_res_blocks=int(model["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in model["attn_resolutions"]),
        dropout=float(model.get("dropout", 0.0)),
        fir_kernel=tuple(model["fir_kernel"]),
        skip_rescale=bool(model["skip_rescale"]),
        fourier_scale=float(model["fourier_scale"]),
        init_scale=float(model.get("init_scale", 0.0)),
        center_input=not centered,
        data_range=(-1.0, 1.0) if centered else (0.0, 1.0),
        scale_by_sigma=bool(model["scale_by_sigma"]),
    )


def sde_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The project's SDE config (``sde.sde_from_config``) of a score_sde VE config.

    Sigmas are in the units of the model's :attr:`NCSNppConfig.data_range`.
    """
    model, _ = _sections(cfg)
    for field in ("sigma_min", "sigma_max"):
        if field not in model:
            raise ValueError(f"score_sde config: missing field model.{field}")
    return {
        "name": "ve",
        "sigma_min": float(model["sigma_min"]),
        "sigma_max": float(model["sigma_max"]),
    }


def load_config(name_or_path: str) -> dict[str, Any]:
    """A score_sde config: a preset name from :data:`PRESETS`, one of score_sde's own
    ``configs/**/*.py`` files (read, not run: :func:`read_py_config`), or a JSON file
    with ``"model"`` (and optionally ``"data"``, ``"sampling"``) sections."""
    if name_or_path in PRESETS:
        return copy.deepcopy(PRESETS[name_or_path])
    if not files.isfile(name_or_path):
        raise ValueError(
            f"score_sde config {name_or_path!r}: neither a preset {sorted(PRESETS)} nor a file"
        )
    if name_or_path.endswith(".py"):
        return read_py_config(name_or_path)
    try:
        cfg = files.read_json_object(name_or_path)
    except ValueError as e:
        detail = str(e).removeprefix(f"{name_or_path}: ")
        raise ValueError(f"{name_or_path}: not a JSON score_sde config ({detail})") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError(f"{name_or_path}: a score_sde config needs a 'model' section")
    return cfg


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything else."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else [*head, node.attr]
    return None


def _base_config(path: str, module: str) -> str:
    """The file of ``from configs.default_x import ...``: found from ``path`` upwards."""
    rel = os.path.join(*module.split(".")) + ".py"
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(folder, rel)):
            return os.path.join(folder, rel)
        if os.path.dirname(folder) == folder:
            raise ValueError(f"{path}: imports {module}, but {rel} is not found above it")
        folder = os.path.dirname(folder)


def _literal(stmt: ast.Assign, key: list[str], path: str) -> tuple[bool, Any]:
    """``(True, value)`` for a literal right-hand side; non-literals are an error in the
    network's sections and skipped elsewhere."""
    try:
        return True, ast.literal_eval(stmt.value)
    except ValueError:
        if key[0] in ("model", "data"):
            raise ValueError(f"{path}:{stmt.lineno}: {'.'.join(key)} is not a literal") from None
        return False, None


def read_py_config(path: str) -> dict[str, Any]:
    """A score_sde ``configs/**/*.py`` file as nested dicts, without running it.

    The file (and the ``configs.default_*`` file it imports) is parsed, and the literal
    assignments ``config.<section>.<field> = ...`` of its functions are collected in
    order, directly or through section aliases (``model = config.model``,
    ``config.data = data = ConfigDict()``).
    """
    tree = ast.parse(files.read_text(path), path)
    config: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("configs."):
            for section, values in read_py_config(_base_config(path, node.module)).items():
                if isinstance(values, dict):
                    config.setdefault(section, {}).update(values)
                else:
                    config[section] = values
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        roots: set[str] = set()  # names bound to the whole config
        aliases: dict[str, str] = {}  # names bound to one section
        for stmt in (s for s in fn.body if isinstance(s, ast.Assign)):
            targets = [t for t in map(_dotted, stmt.targets) if t is not None]
            source = _dotted(stmt.value)
            if isinstance(stmt.value, ast.Call) and all(len(t) == 1 for t in targets):
                roots.update(t[0] for t in targets)  # config = get_default_configs()
                continue
            if source and len(source) == 2 and source[0] in roots:
                aliases.update({t[0]: source[1] for t in targets if len(t) == 1})
                continue
            keys = []
            for head, *rest in targets:
                if head in roots:
                    keys.append(rest)
                elif head in aliases:
                    keys.append([aliases[head], *rest])
                elif not rest and isinstance(stmt.value, ast.Call):
                    keys.append(None)  # the alias half of config.x = x = ConfigDict()
            sections = [k[0] for k in keys if k and len(k) == 1]
            if isinstance(stmt.value, ast.Call) and sections:
                config.setdefault(sections[0], {})
                aliases.update({t[0]: sections[0] for t in targets if len(t) == 1})
                continue
            for key in (k for k in keys if k):
                ok, value = _literal(stmt, key, path)
                if ok and len(key) == 2:
                    config.setdefault(key[0], {})[key[1]] = value
                elif ok and len(key) == 1:
                    config[key[0]] = value
    if "model" not in config:
        raise ValueError(f"{path}: no config.model assignments found (not a score_sde config?)")
    return config


def read_score_sde_checkpoint(path: str) -> dict[str, Any]:
    """The EMA parameters (``params_ema``) of a score_sde ``checkpoint_<n>`` file."""
    with files.open_file(path, "rb") as f:
        data = f.read()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types for corrupt/truncated input
        raise ValueError(
            f"{path}: not a score_sde checkpoint (msgpack: {type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or "params_ema" not in state:
        fields = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path}: not a score_sde checkpoint: no 'params_ema' among {fields}; "
            f"expected the State fields {STATE_FIELDS}"
        )
    params = state["params_ema"]
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path}: params_ema is empty or not a parameter tree")
    return params


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "/"))
        else:
            flat[key] = np.asarray(v)
    return flat


def _resnet(src: str, dst: str) -> dict[str, str]:
    names = {
        "GroupNorm_0": "norm1",
        "Conv_0": "conv1",
        "Dense_0": "temb_proj",
        "GroupNorm_1": "norm2",
        "Conv_1": "conv2",
        "Conv_2": "shortcut",
    }
    return _layers(src, dst, names)


def _attn(src: str, dst: str) -> dict[str, str]:
    m = _layers(src, dst, {"GroupNorm_0": "norm"})
    for i, name in enumerate(("q", "k", "v", "out")):
        m[f"{src}/NIN_{i}/W"] = f"{dst}/{name}/kernel"
        m[f"{src}/NIN_{i}/b"] = f"{dst}/{name}/bias"
    return m


def _layers(src: str, dst: str, names: Mapping[str, str]) -> dict[str, str]:
    m = {}
    for s, d in names.items():
        a, b = ("scale", "bias") if s.startswith("GroupNorm") else ("kernel", "bias")
        m[f"{src}/{s}/{a}"] = f"{dst}/{d}/{a}"
        m[f"{src}/{s}/{b}"] = f"{dst}/{d}/{b}"
    return m


def _combine(src: str, dst: str) -> dict[str, str]:
    return _layers(src, "", {"Conv_0": dst})


def _layer(src: str, dst: str) -> dict[str, str]:
    return _layers("", "", {src: dst})


# Per kind of ncsnpp.block_paths: the flax module class whose instances score_sde's
# NCSNpp numbers in creation order, and the block's keys.
_BLOCKS = {
    "resnet": ("ResnetBlockBigGANpp", _resnet),
    "attn": ("AttnBlockpp", _attn),
    "combine": ("Combine", _combine),
    "norm": ("GroupNorm", _layer),
    "conv": ("Conv", _layer),
}


def key_map(config: NCSNppConfig) -> dict[str, str]:
    """score_sde parameter path -> model state path, for every weight."""
    m = {"GaussianFourierProjection_0/W": "fourier/W"}
    m.update(_layers("", "", {"Dense_0": "temb0", "Dense_1": "temb1", "Conv_0": "conv_in"}))
    count = dict.fromkeys(_BLOCKS, 0) | {"conv": 1}  # Conv_0 is the input conv
    for kind, path in ncsnpp.block_paths(config):
        flax_class, block_keys = _BLOCKS[kind]
        m.update(block_keys(f"{flax_class}_{count[kind]}", path))
        count[kind] += 1
    m = {k.lstrip("/"): v.lstrip("/") for k, v in m.items()}
    shapes = ncsnpp.abstract_params(config)
    return {k: v for k, v in m.items() if v in shapes}  # drops absent 1x1 shortcuts


def params_from_score_sde(
    params_tree: Mapping[str, Any], config: NCSNppConfig, source: str = "params_ema"
) -> nnx.State:
    """The model state from score_sde's ``params_ema`` tree (nested dicts of arrays).

    GroupNorm ``(1, 1, 1, C)`` shapes are accepted; every other key and shape is
    checked before anything is built, and all offending keys are reported at once.
    """
    flat = _flatten(params_tree)
    mapping = key_map(config)
    shapes = ncsnpp.abstract_params(config)
    found = {}
    for k, v in flat.items():
        if k in mapping and "/GroupNorm_" in f"/{k}" and v.shape == (1, 1, 1) + shapes[mapping[k]]:
            v = v.reshape(v.shape[3:])
        found[k] = v
    state_dict.check_tensors(source, found, {k: shapes[dst] for k, dst in mapping.items()})
    values = {dst: np.asarray(found[k], np.float32) for k, dst in mapping.items()}
    return diffusers_ncsnpp.state_from_flat(config, values)


CONFIG_FILES = ("score_sde_config.json", "config.json")


def detect(path: str) -> bool:
    """A folder holding a ``checkpoint_<n>``, or a file so named or that starts as a msgpack map."""
    if files.isdir(path):
        return any(_CHECKPOINT.match(name.rstrip("/")) for name in files.listdir(path))
    with files.open_file(path, "rb") as f:  # refuses a FIFO or device without blocking
        head = f.read(1)
    return bool(
        _CHECKPOINT.match(files.basename(path))
        or head in (b"\xde", b"\xdf")
        or (head and 0x81 <= head[0] <= 0x8F)
    )


def checkpoint_file(path: str) -> str:
    """``path`` itself, or the newest ``checkpoint_<n>`` in the folder ``path``."""
    if not files.isdir(path):
        return path
    steps = [
        int(m[1]) for name in files.listdir(path) if (m := _CHECKPOINT.match(name.rstrip("/")))
    ]
    if not steps:
        raise FileNotFoundError(f"{path}: no checkpoint_<n> file in the folder")
    return files.join(path, f"checkpoint_{max(steps)}")


def _find_config(ckpt: str) -> str:
    folder = files.dirname(files.abspath(ckpt))
    for base in (folder, files.dirname(folder)):  # score_sde keeps them in <workdir>/checkpoints
        for name in CONFIG_FILES:
            if files.isfile(files.join(base, name)):
                return files.join(base, name)
    raise ValueError(
        f"{ckpt}: the score_sde config is not in the checkpoint; name a preset "
        f"{sorted(PRESETS)} or put a JSON config ({' or '.join(CONFIG_FILES)}) beside it"
    )


def load(path: str, config: str | Mapping[str, Any] | None = None) -> Imported:
    """Imports a score_sde checkpoint (file, or the newest in a folder) as an ``Imported``.

    Args:
        config: a preset name (:data:`PRESETS`), a JSON file, or the config itself;
            by default a ``score_sde_config.json``/``config.json`` beside the checkpoint
            (or one folder up).
    """
    ckpt = checkpoint_file(path)
    where = config if isinstance(config, str) else "score_sde config"
    if config is None:
        where = _find_config(ckpt)
        config = load_config(where)
    elif isinstance(config, str):
        config = load_config(config)
    try:
        net_config = config_from_score_sde(config)
        sde = sde_config(config)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    state = params_from_score_sde(read_score_sde_checkpoint(ckpt), net_config, source=ckpt)
    return Imported(
        architecture="ncsnpp",
        config=net_config,
        state=state,
        condition="sigma",
        parameterization="score",  # score_sde reads a VE network's output as the score
        data_range="0_1" if net_config.data_range == (0.0, 1.0) else "-1_1",
        sde=sde,
        source={
            "path": os.path.abspath(ckpt),
            "format": FORMAT,
            "sha256": files.sha256(ckpt),
        },
    )
