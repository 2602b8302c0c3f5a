"""Hub model ids (``org/name[@revision]``) for the text encoders and CLIP score, resolved offline.

A Hugging Face cache is laid out in tmp_path exactly as huggingface_hub writes it
(``models--org--name/refs/<ref>`` holding a commit, ``snapshots/<commit>/<files>``) from the shipped
tiny checkpoints, and HF_HUB_OFFLINE=1 makes any attempt to reach the network an error.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import huggingface_hub
import jax
import numpy as np
import pytest
from huggingface_hub import constants
from safetensors.numpy import load_file, save_file

from ediff_jax.hub import CheckpointNotFoundError, resolve_checkpoint_dir
from ediff_jax.text import (
    CheckpointError,
    load_clip_text_encoder,
    load_t5_encoder,
    load_tokenizer,
    resolve_text_path,
)
from ediff_jax.text.conditioning import load_text_encoders

MAIN = "a" * 40  # commit hashes: 40 hex digits, as the cache names snapshot folders
PERTURBED = "b" * 40


def _add_snapshot(cache: pathlib.Path, repo_id: str, commit: str, source: pathlib.Path, refs: tuple[str, ...]) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline: huggingface_hub reads the file verbatim


def _perturbed_copy(source: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, dst)
    tensors = load_file(dst / "model.safetensors")
    rng = np.random.default_rng(0)
    save_file(
        {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in tensors.items()},
        dst / "model.safetensors",
    )
    return dst


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> pathlib.Path:
    """org/t5: main -> the builtin T5, v2 and commit PERTURBED -> perturbed weights; org/clip: main only."""
    root = tmp_path_factory.mktemp("hf")
    cache = root / "hub"
    t5, clip = resolve_text_path("builtin:t5_shapes"), resolve_text_path("builtin:clip_shapes")
    _add_snapshot(cache, "org/t5", MAIN, t5, ("main",))
    _add_snapshot(cache, "org/t5", PERTURBED, _perturbed_copy(t5, root / "t5_perturbed"), ("v2",))
    _add_snapshot(cache, "org/clip", MAIN, clip, ("main",))
    return cache


@pytest.fixture(autouse=True)
def offline(hub_cache, monkeypatch, tmp_path) -> pathlib.Path:
    """Env vars for a fresh process, and huggingface_hub's constants, read once at its import."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # relative ids must not meet stray directories
    return hub_cache


def _snapshot(cache: pathlib.Path, repo_id: str, commit: str) -> pathlib.Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def _assert_trees_equal(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _t5_weight(params) -> np.ndarray:
    return np.asarray(params["shared"]["embedding"])


def test_hub_ids_load_the_same_encoders_as_local_directories(offline) -> None:
    by_id, params_by_id = load_t5_encoder("org/t5")
    local, params_local = load_t5_encoder("builtin:t5_shapes")
    assert by_id == local
    _assert_trees_equal(params_by_id, params_local)
    tokenizer = load_tokenizer("org/t5")
    batch = tokenizer(["a red circle above a blue square"], padding="max_length", max_length=16, return_tensors="np")
    apply = jax.jit(lambda p, ids, mask: local.apply({"params": p}, ids, mask))  # one compile for both
    out_by_id = apply(params_by_id, batch["input_ids"], batch["attention_mask"])
    out_local = apply(params_local, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(np.asarray(out_by_id), np.asarray(out_local))

    clip_by_id, clip_params = load_clip_text_encoder("org/clip")
    clip_local, clip_local_params = load_clip_text_encoder("builtin:clip_shapes")
    assert clip_by_id == clip_local
    _assert_trees_equal(clip_params, clip_local_params)


def test_pinned_revision_picks_its_snapshot(offline) -> None:
    perturbed = load_file(_snapshot(offline, "org/t5", PERTURBED) / "model.safetensors")["shared.weight"]
    original = load_file(_snapshot(offline, "org/t5", MAIN) / "model.safetensors")["shared.weight"]
    assert np.max(np.abs(perturbed - original)) > 1e-3
    for pinned in (f"org/t5@{PERTURBED}", "org/t5@v2"):
        np.testing.assert_array_equal(_t5_weight(load_t5_encoder(pinned)[1]), perturbed)
    for unpinned in ("org/t5", "org/t5@main"):
        np.testing.assert_array_equal(_t5_weight(load_t5_encoder(unpinned)[1]), original)
    assert resolve_checkpoint_dir("org/t5", revision="v2") == _snapshot(offline, "org/t5", PERTURBED)
    with pytest.raises(CheckpointError, match="pins revision 'v2' but revision='main'"):
        resolve_checkpoint_dir("org/t5@v2", revision="main")


def test_config_text_paths_take_hub_ids(offline) -> None:
    """The training config's path: strings through resolve_text_path into the loaders."""
    text_config = {"t5_path": "org/t5@v2", "clip_path": "org/clip", "t5_max_length": 8, "clip_max_length": 8}
    encoders = load_text_encoders(text_config)
    perturbed = load_file(_snapshot(offline, "org/t5", PERTURBED) / "model.safetensors")["shared.weight"]
    np.testing.assert_array_equal(_t5_weight(encoders.params["t5"]), perturbed)
    assert encoders.clip_tokenizer is not None


@pytest.mark.parametrize("text,revision", [("org/missing", "main"), ("org/t5@no-such-tag", "no-such-tag")])
def test_missing_hub_id_is_one_line_naming_id_revision_and_cache(offline, text: str, revision: str) -> None:
    with pytest.raises(CheckpointNotFoundError) as err:
        load_t5_encoder(text)
    message = str(err.value)
    repo_id = text.split("@")[0]
    assert "\n" not in message
    assert f"hub model {repo_id!r} at revision {revision!r}" in message
    assert f"cache {str(offline)!r}" in message
    assert f"hf download {repo_id} --revision {revision}" in message and "unset HF_HUB_OFFLINE" in message
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)  # the CLIs print both


@pytest.mark.parametrize("path", ["./nope", "/tmp/ediff-jax-no-such-dir/nope", "nope", "~/ediff-jax-no-such-dir"])
def test_local_looking_paths_stay_missing_paths(monkeypatch, path: str) -> None:
    def no_hub(*args, **kwargs):
        raise AssertionError(f"{path!r} was sent to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as err:
        load_t5_encoder(path)
    assert "hub model" not in str(err.value)


def test_existing_local_directory_wins_over_hub_id(offline) -> None:
    shutil.copytree(_snapshot(offline, "org/t5", PERTURBED), pathlib.Path("org") / "t5")  # cwd is tmp_path
    perturbed = load_file(pathlib.Path("org/t5/model.safetensors"))["shared.weight"]
    np.testing.assert_array_equal(_t5_weight(load_t5_encoder("org/t5")[1]), perturbed)
    with pytest.raises(CheckpointError, match="'org/t5' is a local directory; revisions apply to hub ids only"):
        load_t5_encoder("org/t5@main")


# ----------------------------------------------------------------------------------------------
# CLIP score


@pytest.fixture(scope="module")
def clip_model_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random CLIPModel with an image processor and the builtin CLIP tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer_dir = resolve_text_path("builtin:clip_shapes")
    tokenizer = load_tokenizer(tokenizer_dir)
    text = json.loads((tokenizer_dir / "config.json").read_text())
    text.update(num_hidden_layers=1, vocab_size=len(tokenizer))
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    path = tmp_path_factory.mktemp("clip_model") / "model"
    transformers.CLIPModel(config).eval().save_pretrained(path)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    for file in tokenizer_dir.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy(file, path)
    return path


def test_clip_scorer_from_hub_id(offline, clip_model_dir) -> None:
    from ediff_jax.eval import CLIPScorer
    from ediff_jax.eval.clip_loading import load_clip_vision_encoder

    _add_snapshot(offline, "org/clip-model", MAIN, clip_model_dir, ("main",))
    try:
        scorer = CLIPScorer.from_pretrained("org/clip-model")  # builds no program until it scores
        local = CLIPScorer.from_pretrained(clip_model_dir)
    finally:
        shutil.rmtree(offline / "models--org--clip-model")
    _assert_trees_equal(scorer._vision_params, load_clip_vision_encoder(clip_model_dir)[1])
    _assert_trees_equal(scorer._text_params, local._text_params)
    assert scorer.preprocessing == local.preprocessing and scorer.max_length == local.max_length
