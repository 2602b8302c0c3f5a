"""Text-embedding cache: encode a dataset's captions once, read them during training.

eDiff-I precomputes all T5 and CLIP embeddings offline: with T5-XXL the encoder costs
more than the UNet step. The cache stores one row per *distinct* caption (captions of a
procedural dataset repeat a lot) in an .npz beside the TFDS data, keyed by the encoder
settings, so a cache built for other encoders is never read by mistake.

  python -m ediff_jax.text.cache --config configs/quickstart.py

Training reads it when `config.data.text_cache = True` (building it first if missing).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from etils import epath

from ediff_jax import logs
from ediff_jax.paths import as_path
from ediff_jax.text.conditioning import TextEncoders

COND_KEYS = ("t5", "t5_mask", "clip", "clip_mask", "clip_pooled")


def cache_key(text_config: Mapping[str, Any], fingerprints: Mapping[str, str]) -> str:
    """Identifies the encoders an embedding was made with: settings *and* weights (sha256), so
    rebuilt encoders under the same path never read embeddings of the old ones."""
    keys = ("t5_path", "clip_path", "t5_max_length", "clip_max_length")
    settings = {k: str(text_config[k]) for k in keys}
    blob = json.dumps({**settings, "weights": dict(fingerprints)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(builder: Any, text_config: Mapping[str, Any], fingerprints: Mapping[str, str]) -> epath.Path:
    """`<dataset version dir>/text_embeddings/<key>.npz`, beside the TFDS shards."""
    return as_path(builder.data_dir) / "text_embeddings" / f"{cache_key(text_config, fingerprints)}.npz"


class TextEmbeddingCache:
    """Distinct captions and their conditioning arrays; `lookup` gathers rows by caption."""

    def __init__(self, captions: Sequence[str], arrays: Mapping[str, np.ndarray]):
        self.captions = list(captions)
        self.arrays = {k: np.asarray(arrays[k]) for k in COND_KEYS}
        self.index = {c: i for i, c in enumerate(self.captions)}

    def __len__(self) -> int:
        return len(self.captions)

    def lookup(self, captions: Iterable[str]) -> dict[str, np.ndarray]:
        captions = list(captions)
        missing = [c for c in captions if c not in self.index]
        if missing:
            raise KeyError(
                f"{len(missing)} captions are not in the text-embedding cache (e.g. {missing[0]!r}); it was built "
                "for another dataset version. Delete the cache file to rebuild it."
            )
        rows = np.array([self.index[c] for c in captions])
        return {k: v[rows] for k, v in self.arrays.items()}

    def save(self, path: str | os.PathLike) -> epath.Path:
        path = as_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        with tmp.open("wb") as f:  # a file object: also on object stores
            np.savez(f, captions=np.array(self.captions, dtype=str), **self.arrays)
        tmp.replace(path)  # atomic: a crash never leaves a truncated cache behind
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextEmbeddingCache":
        with as_path(path).open("rb") as f, np.load(f) as data:
            return cls([str(c) for c in data["captions"]], {k: data[k] for k in COND_KEYS})


def encode_captions(encoders: TextEncoders, captions: Sequence[str], batch_size: int = 256) -> TextEmbeddingCache:
    """Encodes distinct captions in fixed-size batches (one compiled program).

    Runs where the encoders' weights are: split over a mesh (as `build_experiment` places them),
    every device of it takes part and the embeddings come back replicated, so each host can read
    them (`jax.device_get`), on a pod as on one machine.
    """
    distinct = sorted(set(captions))
    meshes = {x.sharding.mesh for x in jax.tree.leaves(encoders.params)
              if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)}
    if len(meshes) == 1:
        encode = jax.jit(encoders.encode, out_shardings=jax.sharding.NamedSharding(meshes.pop(),
                                                                                  jax.sharding.PartitionSpec()))
    else:
        encode = jax.jit(encoders.encode)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in COND_KEYS}
    for start in range(0, len(distinct), batch_size):
        part = distinct[start:start + batch_size]
        padded = part + [part[-1]] * (batch_size - len(part))  # keep the shape fixed: no recompiles
        cond = jax.device_get(encode(encoders.params, encoders.tokenize(padded)))
        for k in COND_KEYS:
            chunks[k].append(np.asarray(cond[k])[: len(part)])
    return TextEmbeddingCache(distinct, {k: np.concatenate(v) for k, v in chunks.items()})


def build_cache(builder: Any, encoders: TextEncoders, text_config: Mapping[str, Any],
                splits: Sequence[str] | None = None) -> epath.Path:
    """Encodes every caption of `splits` (default: all) and writes the cache file."""
    from ediff_jax.data import pipeline

    splits = list(splits or builder.info.splits.keys())
    captions: list[str] = []
    for split in splits:
        captions.extend(pipeline.read_captions(builder, split))
    cache = encode_captions(encoders, captions)
    path = cache.save(cache_path(builder, text_config, encoders.fingerprints))
    logs.info(f"Cached {len(cache)} distinct caption embeddings of {len(captions)} examples to {path}")
    return path


def load_or_build_cache(builder: Any, encoders: TextEncoders, text_config: Mapping[str, Any]) -> TextEmbeddingCache:
    path = cache_path(builder, text_config, encoders.fingerprints)
    if not path.exists():
        build_cache(builder, encoders, text_config)
    return TextEmbeddingCache.load(path)


def main(argv: Sequence[str]) -> None:
    from ediff_jax import parallel, sharding
    from ediff_jax.config_utils import load_config
    from ediff_jax.data import pipeline
    from ediff_jax.text.conditioning import load_text_encoders

    import argparse

    parser = argparse.ArgumentParser(description="Precompute T5/CLIP embeddings of a dataset's captions.")
    parser.add_argument("--config", required=True, help="Config file[:arg], e.g. configs/quickstart.py")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: the config's).")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    builder = pipeline.prepare(pipeline.builder_from_config(config.data, data_dir=args.data_dir or config.data.data_dir))
    # The encoders where training puts them (`training.place_encoders`): split over config.mesh's fsdp axis.
    mesh = parallel.make_mesh(config.mesh.to_dict())
    placement = sharding.encoder_leaf_sharding(mesh, int(config.sharding.fsdp_min_size))
    build_cache(builder, load_text_encoders(config.text, sharding=placement), config.text)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
