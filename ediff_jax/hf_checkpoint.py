"""Hugging Face checkpoint directories (``config.json`` + safetensors), read without PyTorch.

Shared by every loader of HF-layout weights: the text encoders (`ediff_jax.text.loading`) and
the CLIP vision tower (`ediff_jax.eval.clip_loading`). Why it exists: HF checkpoints (T5-XXL's
sharded ones included) load without PyTorch and without ever unpickling, and big models are
placed onto devices leaf by leaf (``jax.device_put`` per tensor with the caller's sharding)
instead of being materialised on one device first. `assemble` maps our Flax param paths to HF
tensor names, so a checkpoint that does not fit the config fails loudly with the tensors that
are missing or extra. ``builtin:NAME`` names the encoders shipped in ``ediff_jax/assets/text``.
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

from ediff_jax.hub import (
    CheckpointError,
    CheckpointNotFoundError,
    resolve_checkpoint_dir,
)

ParamPath = tuple[str, ...]
ShardingArg = jax.sharding.Sharding | Callable[[ParamPath, tuple[int, ...]], jax.sharding.Sharding] | None

_BUILTIN_PREFIX = "builtin:"
_BUILTIN_ROOT = pathlib.Path(__file__).resolve().parent / "assets" / "text"
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


def is_builtin_dir(directory: pathlib.Path) -> bool:
    return directory.resolve().parent == _BUILTIN_ROOT


def checkpoint_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """The local directory behind ``builtin:NAME``, a path or a hub id (resolve once, then load from it):
    a builtin asset, an existing local directory, or a hub id's cached snapshot."""
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


def damaged(directory: pathlib.Path, file: pathlib.Path, problem: str) -> CheckpointError:
    """The error for an unreadable weights/config file; builtins name the command that rebuilds them."""
    fix = (
        f"rebuild the shipped encoders with `{REBUILD_COMMAND}` (or reinstall the package)"
        if is_builtin_dir(directory)
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
        raise damaged(directory, report, "is not a valid pretraining report (no weights_sha256)") from None
    actual = weights_fingerprint(directory)
    if actual != expected:
        raise damaged(directory, directory / "model.safetensors",
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


def read_config(directory: pathlib.Path) -> dict[str, Any]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        if is_builtin_dir(directory):
            raise damaged(directory, config_file, "is missing")
        raise CheckpointError(
            f"{str(directory)!r} has no config.json. Save the model with transformers' "
            "`model.save_pretrained(dir)` (it writes config.json next to the weights)."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise damaged(directory, config_file, f"is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(config_file)!r} must hold a JSON object")
    return config

# ----------------------------------------------------------------------------------------------
# safetensors reading


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
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
    if is_builtin_dir(directory):
        raise damaged(directory, single, "is missing")
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


class SafetensorsReader:
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


def float_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise CheckpointError(
            f"dtype={dtype!r} is not a dtype; pass a floating dtype such as jnp.float32 or jnp.bfloat16"
        ) from err
    if not jnp.issubdtype(resolved, jnp.floating):
        raise CheckpointError(
            f"cannot cast checkpoint weights to dtype={resolved.name!r}: it is not a floating dtype; "
            "pass jnp.float32, jnp.bfloat16 or jnp.float16"
        )
    return resolved


def sharding_for(
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


def assemble(
    reader: SafetensorsReader,
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
        flat[path] = jax.device_put(array, sharding_for(sharding, path, array.shape))
        del array
    return traverse_util.unflatten_dict(flat)



@contextlib.contextmanager
def open_checkpoint(directory: pathlib.Path) -> Iterator[SafetensorsReader]:
    files = weight_files(directory)
    if is_builtin_dir(directory):
        _check_recorded_fingerprint(directory)
    with contextlib.ExitStack() as stack:
        try:
            reader = SafetensorsReader(files, stack)
        except Exception as err:  # safetensors raises its own error types for truncated or invalid headers
            bad = next((f for f in files if not readable_safetensors(f)), files[0])
            raise damaged(directory, bad, f"is not a readable safetensors file ({err})") from err
        yield reader


def readable_safetensors(file: pathlib.Path) -> bool:
    try:
        with safe_open(str(file), framework="np"):
            return True
    except Exception:
        return False
