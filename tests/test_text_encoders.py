"""Parity of our Flax T5 / CLIP text encoders with transformers' PyTorch models, plus loader behaviour.

Every reference model is tiny, random, built once per module, saved with ``save_pretrained`` and read
back through our loaders: this checks the math and the HF name mapping at the same time.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from ediff_jax.text import (
    CheckpointError,
    load_clip_text_encoder,
    load_t5_encoder,
    load_tokenizer,
    resolve_text_path,
)
from ediff_jax.text.t5 import relative_position_buckets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 50


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ----------------------------------------------------------------------------------------------
# Reference checkpoints


def _t5_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded batch (lengths 20, 9, 3): EOS=1 closes each sequence, PAD=0 after it."""
    rng = np.random.default_rng(seed)
    lengths, width = (20, 9, 3), 20
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = rng.integers(3, VOCAB, n - 1)
        ids[row, n - 1] = 1
        mask[row, :n] = 1
    return ids, mask


def _clip_batch(eos: int, bos: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """BOS, tokens, EOS, then EOS used as padding (as CLIPTokenizer pads); lengths 12, 6, 3."""
    rng = np.random.default_rng(seed)
    lengths, width = (12, 6, 3), 12
    ids = np.full((len(lengths), width), eos, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 0] = bos
        ids[row, 1 : n - 1] = rng.integers(3, VOCAB - 3, n - 2)
        ids[row, n - 1] = eos
        mask[row, :n] = 1
    return ids, mask


def _t5_config(kind: str):
    ff = "relu" if kind == "v1_0" else "gated-gelu"
    cls = transformers.UMT5Config if kind == "umt5" else transformers.T5Config
    return cls(
        vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3, num_decoder_layers=1,
        feed_forward_proj=ff, dropout_rate=0.0,
    )


T5_KINDS = {
    "v1_0": "T5ForConditionalGeneration",  # also checks that decoder.* / lm_head are ignored
    "v1_1": "T5EncoderModel",
    "umt5": "UMT5EncoderModel",  # per-layer relative position bias
}


@pytest.fixture(scope="module")
def t5_checkpoints(tmp_path_factory) -> dict[str, tuple[pathlib.Path, np.ndarray, ...]]:
    root = tmp_path_factory.mktemp("t5")
    ids, mask = _t5_batch()
    out = {}
    for kind, class_name in T5_KINDS.items():
        torch.manual_seed(0)
        model = getattr(transformers, class_name)(_t5_config(kind)).eval()
        model.save_pretrained(root / kind)
        encoder = model.get_encoder() if hasattr(model, "decoder") else model
        with torch.no_grad():
            ref = encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        out[kind] = (root / kind, ids, mask, ref.numpy())
        if kind == "v1_1":
            model.save_pretrained(root / "v1_1_sharded", max_shard_size="20KB")
            model.to(torch.bfloat16).save_pretrained(root / "v1_1_bf16")
    return out


# BOS is the largest id, so pooling at argmax(input_ids) instead of the first EOS would be caught.
EOS = VOCAB - 2
CLIP_CASES = {
    # name: (class, hidden_act, eos_token_id in config)
    "text_quick_gelu": ("CLIPTextModel", "quick_gelu", EOS),
    "text_gelu": ("CLIPTextModel", "gelu", EOS),
    "proj_quick_gelu": ("CLIPTextModelWithProjection", "quick_gelu", EOS),
    "proj_gelu": ("CLIPTextModelWithProjection", "gelu", EOS),
    "legacy_eos_2": ("CLIPTextModel", "quick_gelu", 2),  # pooled at argmax(input_ids)
    "full_clip": ("CLIPModel", "quick_gelu", EOS),  # text_config nesting, vision weights ignored
}


def _clip_text_config(act: str, eos: int):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=24, hidden_act=act,
        bos_token_id=VOCAB - 1, eos_token_id=eos, pad_token_id=eos,
    )


@pytest.fixture(scope="module")
def clip_checkpoints(tmp_path_factory) -> dict[str, tuple[pathlib.Path, np.ndarray, ...]]:
    root = tmp_path_factory.mktemp("clip")
    out = {}
    for name, (class_name, act, eos) in CLIP_CASES.items():
        text_config = _clip_text_config(act, eos)
        torch.manual_seed(0)
        if class_name == "CLIPModel":
            vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=8, patch_size=4)
            config = transformers.CLIPConfig(
                text_config=text_config.to_dict(), vision_config=vision, projection_dim=24
            )
            model = transformers.CLIPModel(config).eval()
        else:
            model = getattr(transformers, class_name)(text_config).eval()
        model.save_pretrained(root / name)
        if eos == 2:
            # Legacy vocabularies: EOS is the largest id and padding is smaller, so argmax finds EOS
            # (pooling at the first id 2 would read position 0 instead).
            ids, mask = _clip_batch(eos=VOCAB - 1, bos=VOCAB - 2)
            ids = np.where(mask == 1, ids, 0)
        else:
            ids, mask = _clip_batch(eos=EOS, bos=VOCAB - 1)  # padding reuses EOS, as CLIPTokenizer does
        inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        with torch.no_grad():
            if class_name == "CLIPModel":
                text = model.text_model(**inputs)
                hidden, pooled = text.last_hidden_state, model.text_projection(text.pooler_output)
            elif class_name == "CLIPTextModelWithProjection":
                res = model(**inputs)
                hidden, pooled = res.last_hidden_state, res.text_embeds
            else:
                res = model(**inputs)
                hidden, pooled = res.last_hidden_state, res.pooler_output
        out[name] = (root / name, ids, mask, hidden.numpy(), pooled.numpy())
    return out


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (64, 256), (16, 32)])
def test_relative_position_buckets_match_hf(num_buckets: int, max_distance: int) -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(300)[None, :] - torch.arange(290)[:, None]
    ref = T5Attention._relative_position_bucket(relative, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(290, 300, num_buckets, max_distance), ref)


@pytest.mark.parametrize("kind", list(T5_KINDS))
def test_t5_matches_torch(t5_checkpoints, kind: str) -> None:
    path, ids, mask, ref = t5_checkpoints[kind]
    module, params = load_t5_encoder(path)
    assert module.config.per_layer_position_bias == (kind == "umt5")
    out = jax.jit(module.apply)({"params": params}, ids, mask)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _max_diff(out, ref) <= TOL


@pytest.mark.parametrize("name", list(CLIP_CASES))
def test_clip_matches_torch(clip_checkpoints, name: str) -> None:
    path, ids, mask, ref_hidden, ref_pooled = clip_checkpoints[name]
    module, params = load_clip_text_encoder(path)
    assert ("text_projection" in params) == (CLIP_CASES[name][0] != "CLIPTextModel")
    hidden, pooled = jax.jit(module.apply)({"params": params}, ids, mask)
    assert hidden.shape == ref_hidden.shape and pooled.shape == ref_pooled.shape
    assert _max_diff(hidden, ref_hidden) <= TOL
    assert _max_diff(pooled, ref_pooled) <= TOL


def test_sharded_checkpoint_matches_torch(t5_checkpoints) -> None:
    path = t5_checkpoints["v1_1"][0].parent / "v1_1_sharded"
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    _, ids, mask, ref = t5_checkpoints["v1_1"]
    module, params = load_t5_encoder(path)
    assert _max_diff(jax.jit(module.apply)({"params": params}, ids, mask), ref) <= TOL


# ----------------------------------------------------------------------------------------------
# Placement and dtypes


def test_sharding_callable_places_each_leaf(t5_checkpoints) -> None:
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    chosen: dict[tuple[str, ...], NamedSharding] = {}

    def shard(path: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        spec = P(None, "model") if len(shape) == 2 and shape[-1] % 8 == 0 else P()
        chosen[path] = NamedSharding(mesh, spec)
        return chosen[path]

    path, ids, mask, ref = t5_checkpoints["v1_1"]
    module, params = load_t5_encoder(path, sharding=shard)
    flat = {tuple(k.key for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(flat) == set(chosen)
    for key, leaf in flat.items():
        assert leaf.sharding == chosen[key], key
    assert flat[("shared", "embedding")].sharding.spec == P(None, "model")
    assert _max_diff(jax.jit(module.apply)({"params": params}, ids, mask), ref) <= TOL


def test_single_sharding_applies_to_every_leaf(clip_checkpoints) -> None:
    replicated = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), P())
    path = clip_checkpoints["proj_gelu"][0]
    _, params = load_clip_text_encoder(path, sharding=replicated)
    assert all(leaf.sharding == replicated for leaf in jax.tree_util.tree_leaves(params))


def test_bf16_cast(t5_checkpoints, clip_checkpoints) -> None:
    path, ids, mask, ref = t5_checkpoints["v1_1"]
    module, params = load_t5_encoder(path, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = jax.jit(module.apply)({"params": params}, ids, mask)
    assert out.dtype == jnp.bfloat16
    assert _max_diff(out, ref) <= 0.05 * np.abs(ref).max()

    path, ids, mask, _, ref_pooled = clip_checkpoints["proj_quick_gelu"]
    module, params = load_clip_text_encoder(path, dtype="bfloat16")  # dtype names are accepted too
    _, pooled = jax.jit(module.apply)({"params": params}, ids, mask)
    assert pooled.dtype == jnp.bfloat16
    assert _max_diff(pooled, ref_pooled) <= 0.05 * np.abs(ref_pooled).max() + 1e-2


def test_bf16_checkpoint_reads_exactly(t5_checkpoints) -> None:
    path = t5_checkpoints["v1_1"][0].parent / "v1_1_bf16"
    model = transformers.T5EncoderModel.from_pretrained(path, local_files_only=True)  # local dir, not the hub
    _, params = load_t5_encoder(path)  # float32 from bf16 storage
    expected = model.encoder.block[0].layer[0].SelfAttention.q.weight.detach().float().numpy().T
    assert params["block_0"]["attention"]["q"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["block_0"]["attention"]["q"]["kernel"]), expected)


# ----------------------------------------------------------------------------------------------
# Bad input


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_files(tmp_path, t5_checkpoints) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_t5_encoder(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="builtin:t5_shapes"):  # lists the builtins as a fix
        load_clip_text_encoder("builtin:no_such_asset")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_t5_encoder(tmp_path)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(t5_checkpoints["v1_1"][0] / "config.json", only_config)
    with pytest.raises(CheckpointError, match="no weights.*model.safetensors"):
        load_t5_encoder(only_config)
    (only_config / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="unpickling.*safe_serialization=True"):
        load_t5_encoder(only_config)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(only_config)


def test_wrong_architecture(tmp_path, t5_checkpoints, clip_checkpoints) -> None:
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match=r"model_type='bert'.*expects model_type in \['t5'"):
        load_t5_encoder(bert)
    with pytest.raises(CheckpointError, match="model_type='t5'.*load_t5_encoder"):
        load_clip_text_encoder(t5_checkpoints["v1_1"][0])
    with pytest.raises(CheckpointError, match="model_type='clip_text_model'"):
        load_t5_encoder(clip_checkpoints["text_gelu"][0])


def test_missing_and_unexpected_tensors_are_listed(tmp_path, t5_checkpoints) -> None:
    path = _copy(t5_checkpoints["v1_1"][0], tmp_path / "edited")
    tensors = load_file(path / "model.safetensors")
    del tensors["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    tensors["encoder.block.1.layer.1.DenseReluDense.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_t5_encoder(path)
    message = str(err.value)
    assert "1 missing tensors ['encoder.block.1.layer.1.DenseReluDense.wi_1.weight']" in message
    assert "1 unexpected tensors ['encoder.block.1.layer.1.DenseReluDense.extra.weight']" in message
    assert "config.json belongs to these weights" in message


def test_config_weight_mismatch(tmp_path, t5_checkpoints, clip_checkpoints) -> None:
    path = _copy(t5_checkpoints["v1_1"][0], tmp_path / "fewer_layers")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_layers": 2}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['encoder.block.2"):
        load_t5_encoder(path)
    path = _copy(clip_checkpoints["text_gelu"][0], tmp_path / "wider")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match=r"shapes .* disagree .*fc1"):
        load_clip_text_encoder(path)


@pytest.mark.parametrize(
    "dtype,message", [(jnp.int32, "not a floating dtype"), ("float42", "is not a dtype")]
)
def test_bad_dtype(t5_checkpoints, dtype, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_t5_encoder(t5_checkpoints["v1_1"][0], dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Paths and the embedded default assets


def test_resolve_text_path() -> None:
    import ediff_jax

    assert resolve_text_path("builtin:t5_shapes") == (
        pathlib.Path(ediff_jax.__file__).resolve().parent / "assets" / "text" / "t5_shapes"
    )
    assert resolve_text_path("~/ckpt") == pathlib.Path.home() / "ckpt"
    assert resolve_text_path("relative/dir") == pathlib.Path("relative/dir")


@pytest.mark.parametrize("name", ["t5_shapes", "clip_shapes", "t5_shapes_v2", "clip_shapes_v2"])
def test_builtin_assets_round_trip(name: str) -> None:
    path = resolve_text_path(f"builtin:{name}")
    assert sum(f.stat().st_size for f in path.iterdir()) < 1_000_000
    tokenizer = load_tokenizer(path)
    batch = tokenizer(
        ["a red circle to the left of a blue square", "a purple triangle in the bottom right"],
        padding="max_length", max_length=32, truncation=True, return_tensors="np",
    )
    first = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    if name.startswith("t5_shapes"):
        assert tokenizer.unk_token_id not in first and first[-1] == tokenizer.eos_token_id
        assert len(first) == 11  # every caption word is one piece, plus </s>
        module, params = load_t5_encoder(path)
        out = jax.jit(module.apply)({"params": params}, batch["input_ids"], batch["attention_mask"])
        assert out.shape == (2, 32, 64)
    else:
        # CLIP has no <unk>: unknown text maps to <|endoftext|>, which may only close the sequence.
        assert first[0] == tokenizer.bos_token_id and first[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in first[1:-1] and len(first) == 12
        module, params = load_clip_text_encoder(path)
        apply = jax.jit(module.apply)
        hidden, pooled = apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        assert hidden.shape == (2, 32, 64) and pooled.shape == (2, 64)
