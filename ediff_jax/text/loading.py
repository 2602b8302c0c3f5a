"""Load Hugging Face T5 / CLIP text checkpoints (``config.json`` + safetensors) into our Flax modules.

Why this file exists: we want HF checkpoints (including T5-XXL's sharded ones) without PyTorch at
load time and without ever unpickling, and we want big encoders placed straight onto devices leaf by
leaf (``jax.device_put`` per tensor with the caller's sharding) instead of materialising the whole
tree on one device first. Names are mapped from our Flax param paths to HF tensor names, so a
checkpoint that does not fit the config fails loudly with the tensors that are missing or extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from ediff_jax.hub import CheckpointError, CheckpointNotFoundError, resolve_checkpoint_dir
from ediff_jax.text.clip import CLIPTextEncoder, CLIPTextEncoderConfig
from ediff_jax.text.t5 import T5Encoder, T5EncoderConfig

ParamPath = tuple[str, ...]
ShardingArg = jax.sharding.Sharding | Callable[[ParamPath, tuple[int, ...]], jax.sharding.Sharding] | None

T5_MODEL_TYPES = ("t5", "mt5", "umt5")
CLIP_MODEL_TYPES = ("clip_text_model", "clip")
_BUILTIN_PREFIX = "builtin:"
_BUILTIN_ROOT = pathlib.Path(__file__).resolve().parent.parent / "assets" / "text"
REBUILD_COMMAND = "python -m ediff_jax.text.build_default_assets"
# Written by the rebuild command beside each trained builtin: settings, metrics and the weights' sha256.
PRETRAINING_REPORT = "pretraining.json"
# Dtypes NumPy cannot name for safetensors; read as raw bytes and view through ml_dtypes.
_RAW_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


# ----------------------------------------------------------------------------------------------
# Paths, configs, tokenizers


def resolve_text_path(path_or_builtin: str | os.PathLike[str]) -> pathlib.Path:
    """``"builtin:NAME"`` -> ``ediff_jax/assets/text/NAME`` in the installed package, else the text as a
    path; the loaders resolve that further (hub ids ``org/name[@revision]``, see ``ediff_jax.hub``)."""
    text = os.fspath(path_or_builtin)
    if text.startswith(_BUILTIN_PREFIX):
        name = text[len(_BUILTIN_PREFIX) :]
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(
                f"invalid builtin text asset name {name!r}; expected e.g. 'builtin:t5_shapes'"
            )
        return _BUILTIN_ROOT / name
    return pathlib.Path(text).expanduser()


def checkpoint_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """The local directory behind ``builtin:NAME``, a path or a hub id (resolve once, then load from it)."""
    return _checkpoint_dir(path)


def _is_builtin_dir(directory: pathlib.Path) -> bool:
    return directory.resolve().parent == _BUILTIN_ROOT


def _checkpoint_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """A builtin asset, an existing local directory, or a hub id's cached snapshot."""
    if not os.fspath(path).startswith(_BUILTIN_PREFIX):
        return resolve_checkpoint_dir(path)
    directory = resolve_text_path(path)
    if not directory.is_dir():
        builtins = sorted(p.name for p in _BUILTIN_ROOT.glob("*") if p.is_dir())
        raise CheckpointNotFoundError(
            f"builtin text asset {str(directory)!r} does not exist; the shipped ones are "
            f"{['builtin:' + b for b in builtins]} (rebuild the trained ones with `{REBUILD_COMMAND}`)"
        )
    return directory


def _damaged(directory: pathlib.Path, file: pathlib.Path, problem: str) -> CheckpointError:
    """The error for an unreadable weights/config file; builtins name the command that rebuilds them."""
    fix = (
        f"rebuild the shipped encoders with `{REBUILD_COMMAND}` (or reinstall the package)"
        if _is_builtin_dir(directory)
        else "re-save or re-download that checkpoint"
    )
    return CheckpointError(f"{str(file)!r} {problem}; {fix}")


def _check_recorded_fingerprint(directory: pathlib.Path) -> None:
    """A trained builtin records its weights' sha256: a changed byte means a damaged install."""
    report = directory / PRETRAINING_REPORT
    if not report.is_file():
        return
    try:
        expected = json.loads(report.read_text())["weights_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise _damaged(directory, report, "is not a valid pretraining report (no weights_sha256)") from None
    actual = weights_fingerprint(directory)
    if actual != expected:
        raise _damaged(directory, directory / "model.safetensors",
                       f"does not match the sha256 recorded in {PRETRAINING_REPORT} (damaged or partly written)")


# Weights up to this size are hashed whole; larger files (T5-XXL's 4.7 GB shards) are fingerprinted
# by size, safetensors header and evenly spaced samples: reading them a second time at every start
# would cost about as much as loading them.
FULL_HASH_MAX_BYTES = 64 << 20
_SAMPLES, _SAMPLE_BYTES = 256, 64 << 10


def weights_fingerprint(directory: str | os.PathLike[str]) -> str:
    """sha256 identifying the weights file(s): what a trained model records about its encoders.

    Exact (sha256 of the bytes) for files up to ``FULL_HASH_MAX_BYTES``, which covers the builtins;
    for larger files, of the size, the header (every tensor's name, shape and offsets) and 256
    evenly spaced 64 KiB samples of the data.
    """
    import hashlib

    directory = pathlib.Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(directory)!r} has no .safetensors weights to fingerprint")
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as f:
            if size <= FULL_HASH_MAX_BYTES:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
                continue
            digest.update(f"{file.name}:{size}".encode())
            (header_size,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(header_size))
            for offset in np.linspace(0, size - _SAMPLE_BYTES, _SAMPLES).astype(np.int64):
                f.seek(int(offset))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        if _is_builtin_dir(directory):
            raise _damaged(directory, config_file, "is missing")
        raise CheckpointError(
            f"{str(directory)!r} has no config.json. Save the model with transformers' "
            "`model.save_pretrained(dir)` (it writes config.json next to the weights)."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise _damaged(directory, config_file, f"is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(config_file)!r} must hold a JSON object")
    return config


def _check_model_type(
    config: Mapping[str, Any], allowed: tuple[str, ...], loader: str, directory: pathlib.Path
) -> str:
    model_type = config.get("model_type")
    if model_type not in allowed:
        other = "load_clip_text_encoder" if loader == "load_t5_encoder" else "load_t5_encoder"
        raise CheckpointError(
            f"{loader} got {str(directory)!r} whose config.json has model_type={model_type!r} "
            f"(architectures={config.get('architectures')}); it expects model_type in {list(allowed)}. "
            f"Point it at a matching checkpoint directory (or use {other} for the other encoder family)."
        )
    return model_type


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The transformers tokenizer saved in ``path`` (T5TokenizerFast / CLIPTokenizerFast), offline only."""
    directory = _checkpoint_dir(path)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
    if not any((directory / f).is_file() for f in tokenizer_files):
        raise CheckpointError(
            f"{str(directory)!r} holds no tokenizer files (tokenizer.json / tokenizer_config.json); "
            "save one with `tokenizer.save_pretrained(dir)`."
        )
    from transformers import AutoTokenizer  # heavy import, only needed here

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # tokenizers/transformers raise many types for a damaged file
        if _is_builtin_dir(directory):
            raise _damaged(directory, directory / "tokenizer.json", f"could not be loaded ({err})") from err
        raise CheckpointError(f"could not load the tokenizer in {str(directory)!r}: {err}") from err


# ----------------------------------------------------------------------------------------------
# safetensors reading


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{str(index)!r} is not a valid safetensors index (it needs a 'weight_map'); re-save the model"
            ) from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{str(index)!r} lists shard files that are missing: {missing[:10]}; re-download or re-save"
            )
        return files
    if single.is_file():
        return [single]
    if _is_builtin_dir(directory):
        raise _damaged(directory, single, "is missing")
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
    hint = (
        f" Found {pickled[:3]}, which we never load (unpickling is unsafe): convert with "
        "`model.save_pretrained(dir, safe_serialization=True)`."
        if pickled
        else " Save the weights with `model.save_pretrained(dir)` (safetensors is the default)."
    )
    raise CheckpointError(
        f"{str(directory)!r} has no weights: expected model.safetensors or "
        f"model.safetensors.index.json.{hint}"
    )


class _SafetensorsReader:
    """Name -> NumPy tensor across one or more safetensors files, read one tensor at a time."""

    def __init__(self, files: list[pathlib.Path], stack: contextlib.ExitStack):
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, pathlib.Path] = {}
        self._headers: dict[pathlib.Path, tuple[int, dict[str, Any]]] = {}  # for raw (bf16/fp8) reads
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="np"))
            for name in handle.keys():
                self._handles[name] = handle
                self._file_of[name] = file

    def names(self) -> list[str]:
        return list(self._handles)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[name].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        dtype = self._handles[name].get_slice(name).get_dtype()
        if dtype in _RAW_DTYPES:
            return self._read_raw(name, _RAW_DTYPES[dtype])
        return self._handles[name].get_tensor(name)

    def _read_raw(self, name: str, dtype: Any) -> np.ndarray:
        # safetensors layout: u64 little-endian header size, JSON header, then the data buffer.
        file = self._file_of[name]
        if file not in self._headers:
            with open(file, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = (8 + header_size, json.loads(f.read(header_size)))
        data_start, header = self._headers[file]
        begin, end = header[name]["data_offsets"]
        with open(file, "rb") as f:
            f.seek(data_start + begin)
            data = f.read(end - begin)
        return np.frombuffer(data, dtype=dtype).reshape(header[name]["shape"])


# ----------------------------------------------------------------------------------------------
# Generic Flax-tree assembly


def _float_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise CheckpointError(
            f"dtype={dtype!r} is not a dtype; pass a floating dtype such as jnp.float32 or jnp.bfloat16"
        ) from err
    if not jnp.issubdtype(resolved, jnp.floating):
        raise CheckpointError(
            f"cannot cast text-encoder weights to dtype={resolved.name!r}: it is not a floating dtype; "
            "pass jnp.float32, jnp.bfloat16 or jnp.float16"
        )
    return resolved


def _sharding_for(
    sharding: ShardingArg, path: ParamPath, shape: tuple[int, ...]
) -> jax.sharding.Sharding | None:
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return sharding
    chosen = sharding(path, shape)
    if not isinstance(chosen, jax.sharding.Sharding):
        raise CheckpointError(
            f"sharding callable returned {chosen!r} for {'/'.join(path)}; it must return a jax.sharding.Sharding"
        )
    return chosen


def _assemble(
    reader: _SafetensorsReader,
    expected: Mapping[ParamPath, jax.ShapeDtypeStruct],
    hf_name_of: Mapping[ParamPath, str],
    ignored: Callable[[str], bool],
    dtype: np.dtype,
    sharding: ShardingArg,
    directory: pathlib.Path,
) -> dict[str, Any]:
    """Check names/shapes against the module's expected tree, then read, convert and place each leaf."""
    wanted = {hf_name_of[path]: path for path in expected}
    present = set(reader.names())
    missing = sorted(set(wanted) - present)
    unexpected = sorted(n for n in present - set(wanted) if not ignored(n))
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {str(directory)!r} do not match the model built from its config.json: "
            f"{len(missing)} missing tensors {missing[:10]}, "
            f"{len(unexpected)} unexpected tensors {unexpected[:10]}. "
            "Check that config.json belongs to these weights (layer count, feed_forward_proj, model_type) "
            "and that the checkpoint is a supported text encoder."
        )

    def target_shape(name: str, path: ParamPath) -> tuple[int, ...]:
        shape = reader.shape(name)
        return shape[::-1] if path[-1] == "kernel" else shape  # torch Linear [out, in] -> Flax [in, out]

    mismatched = [
        f"{name}: checkpoint {target_shape(name, path)} vs expected {tuple(expected[path].shape)}"
        for name, path in wanted.items()
        if target_shape(name, path) != tuple(expected[path].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"tensor shapes in {str(directory)!r} disagree with its config.json ({len(mismatched)} tensors): "
            f"{mismatched[:10]}. Fix config.json (widths, heads, vocab_size, ...) or use the matching weights."
        )

    flat: dict[ParamPath, jax.Array] = {}
    for name, path in wanted.items():
        array = reader.read(name)
        if path[-1] == "kernel":
            array = array.T
        array = np.ascontiguousarray(array.astype(dtype, copy=False))
        flat[path] = jax.device_put(array, _sharding_for(sharding, path, array.shape))
        del array
    return traverse_util.unflatten_dict(flat)


def _expected_tree(module: Any, length: int) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    ids = jnp.zeros((1, length), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, jnp.ones_like(ids))
    return traverse_util.flatten_dict(shapes["params"])


@contextlib.contextmanager
def _open_checkpoint(directory: pathlib.Path) -> Iterator[_SafetensorsReader]:
    files = _weight_files(directory)
    if _is_builtin_dir(directory):
        _check_recorded_fingerprint(directory)
    with contextlib.ExitStack() as stack:
        try:
            reader = _SafetensorsReader(files, stack)
        except Exception as err:  # safetensors raises its own error types for truncated or invalid headers
            bad = next((f for f in files if not _readable_safetensors(f)), files[0])
            raise _damaged(directory, bad, f"is not a readable safetensors file ({err})") from err
        yield reader


def _readable_safetensors(file: pathlib.Path) -> bool:
    try:
        with safe_open(str(file), framework="np"):
            return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# T5


_T5_EMBED_ALIAS = "encoder.embed_tokens.weight"
_T5_RENAMES = {
    "attention": "layer.0.SelfAttention",
    "attn_norm": "layer.0.layer_norm",
    "ff": "layer.1.DenseReluDense",
    "ff_norm": "layer.1.layer_norm",
    "kernel": "weight",
    "embedding": "weight",
}


def _t5_hf_name(path: ParamPath, embedding_name: str) -> str:
    if path == ("shared", "embedding"):
        return embedding_name
    parts = [_T5_RENAMES.get(p, p.replace("block_", "block.")) for p in path]
    return "encoder." + ".".join(parts)


def _t5_ignored(name: str) -> bool:
    # T5Model / T5ForConditionalGeneration extras, and the tied alias of the token embedding.
    return name.startswith(("decoder.", "lm_head.")) or name in ("shared.weight", _T5_EMBED_ALIAS)


def load_t5_encoder(
    path: str | os.PathLike[str], dtype: Any = jnp.float32, sharding: ShardingArg = None
) -> tuple[T5Encoder, dict[str, Any]]:
    """T5 / mT5 / UMT5 encoder from a HF directory (T5EncoderModel, T5Model or T5ForConditionalGeneration).

    ``path``: that directory, ``builtin:NAME``, or a hub id ``org/name[@revision]`` (``ediff_jax.hub``).
    ``sharding``: None (default device), one Sharding for every leaf, or ``(param_path, shape) -> Sharding``.
    """
    target = _float_dtype(dtype)
    directory = _checkpoint_dir(path)
    config = _read_config(directory)
    _check_model_type(config, T5_MODEL_TYPES, "load_t5_encoder", directory)
    try:
        module_config = T5EncoderConfig.from_hf_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"unsupported T5 config in {str(directory)!r}: {err}") from err
    module = T5Encoder(module_config, dtype=target)
    expected = _expected_tree(module, length=4)
    with _open_checkpoint(directory) as reader:
        names = set(reader.names())
        # The token embedding is saved as shared.weight, encoder.embed_tokens.weight, or both (tied).
        only_alias = _T5_EMBED_ALIAS in names and "shared.weight" not in names
        embedding_name = _T5_EMBED_ALIAS if only_alias else "shared.weight"
        hf_names = {p: _t5_hf_name(p, embedding_name) for p in expected}
        params = _assemble(reader, expected, hf_names, _t5_ignored, target, sharding, directory)
    return module, params


# ----------------------------------------------------------------------------------------------
# CLIP


def _clip_hf_name(path: ParamPath, prefix: str) -> str:
    if path[0] == "text_projection":
        return "text_projection.weight"
    head = {
        "token_embedding": "embeddings.token_embedding",
        "position_embedding": "embeddings.position_embedding",
    }
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    parts = [head.get(path[0], path[0].replace("layers_", "encoder.layers.")), *path[1:-1], leaf[path[-1]]]
    return prefix + ".".join(parts)


def _clip_ignored(name: str) -> bool:
    # Full CLIPModel extras, and the non-persistent position_ids buffer some old checkpoints saved.
    return (
        name.startswith(("vision_model.", "visual_projection."))
        or name == "logit_scale"
        or name.endswith("embeddings.position_ids")
    )


def load_clip_text_encoder(
    path: str | os.PathLike[str], dtype: Any = jnp.float32, sharding: ShardingArg = None
) -> tuple[CLIPTextEncoder, dict[str, Any]]:
    """CLIP text tower from a HF directory (CLIPTextModel, CLIPTextModelWithProjection or CLIPModel).

    The projection is used iff the weights contain ``text_projection.weight``. ``path`` and
    ``sharding`` as in ``load_t5_encoder``.
    """
    target = _float_dtype(dtype)
    directory = _checkpoint_dir(path)
    config = _read_config(directory)
    model_type = _check_model_type(config, CLIP_MODEL_TYPES, "load_clip_text_encoder", directory)
    text_config = (config.get("text_config") or {}) if model_type == "clip" else config
    with _open_checkpoint(directory) as reader:
        names = set(reader.names())
        projection = "text_projection.weight"
        projection_dim = reader.shape(projection)[0] if projection in names else None
        try:
            module_config = CLIPTextEncoderConfig.from_hf_dict(text_config, projection_dim)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"unsupported CLIP text config in {str(directory)!r}: {err}") from err
        module = CLIPTextEncoder(module_config, dtype=target)
        expected = _expected_tree(module, length=4)
        # transformers 5 saves CLIPTextModel without the "text_model." prefix; older ones and
        # CLIPTextModelWithProjection / CLIPModel use it.
        prefix = "text_model." if any(n.startswith("text_model.") for n in names) else ""
        hf_names = {p: _clip_hf_name(p, prefix) for p in expected}
        params = _assemble(reader, expected, hf_names, _clip_ignored, target, sharding, directory)
    return module, params
