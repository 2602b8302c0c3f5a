"""Paint-with-words: the bias's closed form, where it applies, token mapping, masks, jit."""

import importlib.util
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from ediff_jax import edm
from ediff_jax.config_utils import base_config
from ediff_jax.models import build_model
from ediff_jax.models.layers import attention, attention_weights
from ediff_jax.paint_with_words import load_mask, parse_paint, pww_bias, pww_cond, token_masks
from ediff_jax.sampling import Sampler, make_model_fn
from ediff_jax.text.conditioning import load_text_encoders, select_encoders, unconditional

REPO = Path(__file__).resolve().parents[1]
TINY = dict(name="unet", channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            cross_attn_resolutions=(16, 8), num_heads=2, context_dim=32)
H = 16
PROMPTS = ["a red circle and a blue square", "a green triangle"]


def halves(size=H):
    left = np.zeros((size, size), np.float32)
    left[:, : size // 2] = 1.0
    return left, 1.0 - left


def reference_bias(scores, masks, sigma, w, mode, valid=None):
    """numpy: per example b, w[b] log(1 + sigma[b]) stat(scores[b] over valid entries) masks[b]."""
    out = np.zeros(masks.shape, np.float64)
    for b in range(scores.shape[0]):
        s = scores[b] if valid is None else scores[b][np.broadcast_to(valid[b], scores[b].shape)]
        stat = s.max() if mode == "max" else s.std()
        out[b] = w[b] * np.log(1 + sigma[b]) * stat * masks[b]
    return out


def random_params(model, *args, seed=0, scale=0.2, **kwargs):
    """Random weights via eval_shape + numpy (compiling flax's initialisers is slow on CPU).
    Non-zero output layers matter: zero-initialised ones would hide conditioning bugs."""
    abstract = jax.eval_shape(partial(model.init, **kwargs), jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (float(path[-1].key == "scale") + scale * rng.standard_normal(a.shape)).astype(a.dtype),
        abstract)


@pytest.fixture(scope="module")
def encoders():
    return load_text_encoders(base_config().text)


@pytest.fixture(scope="module")
def setup(encoders):
    model = build_model(TINY)
    cond = jax.device_get(jax.jit(encoders.encode)(encoders.params, encoders.tokenize(PROMPTS)))
    x = np.random.default_rng(1).normal(size=(2, H, H, 3)).astype(np.float32)
    c_noise = np.array([np.log(20.0) / 4, np.log(2.0) / 4], np.float32)  # sigma 20 and 2
    params = random_params(model, x, c_noise, cond)
    left, right = halves()
    paints = [{"red circle": left, "blue square": right}, {"triangle": right}]
    pww = lambda w: pww_cond(encoders, PROMPTS, paints, H, weight=w)
    apply = jax.jit(lambda p, x, c, cond: model.apply({"params": p}, x, c, cond))
    return model, params, x, c_noise, cond, pww, apply


# --- the bias ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["max", "std"])
def test_pww_bias_closed_form_matches_numpy(mode):
    """w' log(1+sigma) stat(QK^T) A, the statistic per example (a batch mixes examples),
    over valid keys only; unbatched [Nq, Nk] masks use the whole tensor."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 3, 6, 5)).astype(np.float32)
    scores[1] *= 7.0  # example 1's scale must not leak into example 0's bias
    masks = (rng.uniform(size=(2, 1, 6, 5)) * (rng.uniform(size=(2, 1, 6, 5)) > 0.5)).astype(np.float32)
    sigma, w = np.array([20.0, 0.5], np.float32), np.array([0.4, 1.0], np.float32)
    got = pww_bias(scores, masks, sigma, w, mode)
    np.testing.assert_allclose(got, reference_bias(scores, masks, sigma, w, mode), rtol=1e-5, atol=1e-6)
    valid = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 0]], bool)[:, None, None, :]
    got = pww_bias(scores, masks, sigma, w, mode, valid=valid)
    np.testing.assert_allclose(got, reference_bias(scores, masks, sigma, w, mode, valid), rtol=1e-5, atol=1e-6)
    single = pww_bias(scores[0, 0], masks[0, 0], 3.0, 0.7, mode)  # [Nq, Nk], scalars
    stat = scores[0, 0].max() if mode == "max" else scores[0, 0].std()
    np.testing.assert_allclose(single, 0.7 * np.log(4.0) * stat * masks[0, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not broadcast"):
        pww_bias(scores, masks[:, :, :4], sigma, w, mode)
    with pytest.raises(ValueError, match="one value per example"):
        pww_bias(scores, masks, np.ones(3), w, mode)


def test_attention_adds_bias_fn_of_raw_scores_before_scaling():
    """softmax((QK^T + bias_fn(QK^T)) / sqrt(d)) over valid keys, against numpy."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, n, 2, 4)).astype(np.float32) for n in (3, 5, 5))
    mask = np.array([[1, 1, 0, 1, 1]], np.float32)
    a = (rng.uniform(size=(1, 1, 3, 5)) > 0.5).astype(np.float32)
    fn = partial(pww_bias, token_masks=a, sigma=np.array([5.0]), w_prime=np.array([0.8]), batch_dims=1)
    out = np.asarray(attention(q, k, v, mask, bias_fn=fn))
    s = np.einsum("qhd,khd->hqk", q[0], k[0])
    s = (s + 0.8 * np.log(6.0) * s.max() * a[0]) / 2.0
    s = np.where(mask[0] > 0, s, -np.inf)
    wts = np.exp(s - s.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0], np.einsum("hqk,khd->qhd", wts, v[0]), rtol=1e-5, atol=1e-6)


def test_bias_touches_only_masked_queries_and_painted_tokens():
    """Unpainted query rows keep their attention exactly; in painted rows only the painted
    token gains (the ratios among the other tokens are unchanged)."""
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(1, 6, 2, 4)).astype(np.float32), rng.normal(size=(1, 5, 2, 4)).astype(np.float32)
    a = np.zeros((1, 1, 6, 5), np.float32)
    a[0, 0, :3, 2] = 1.0  # queries 0-2 painted for token 2
    bias = np.asarray(pww_bias(np.einsum("bqhd,bkhd->bhqk", q, k), a, np.array([10.0]), np.array([1.0])))
    np.testing.assert_array_equal(bias[0, 0] != 0, a[0, 0] != 0)
    fn = lambda w: partial(pww_bias, token_masks=a, sigma=np.array([10.0]), w_prime=np.array([w]), batch_dims=1)
    w0, w1 = (np.asarray(attention_weights(q, k, bias_fn=fn(w))) for w in (0.0, 1.0))
    np.testing.assert_array_equal(w1[:, :, 3:], w0[:, :, 3:])
    assert np.all(w1[:, :, :3, 2] > w0[:, :, :3, 2])
    others = [0, 1, 3, 4]
    ratio = lambda w: w[:, :, :3, others] / w[:, :, :3, others].sum(-1, keepdims=True)
    np.testing.assert_allclose(ratio(w1), ratio(w0), rtol=1e-5)


# --- phrases, tokens and masks -----------------------------------------------------------


def test_token_mapping_t5_and_clip_with_repeated_word(encoders):
    """'red square' marks the second 'red' only, in both token sequences; multi-piece T5
    words are covered; special, padding and null slots stay 0; missing phrases are named."""
    lt, lc = encoders.t5_max_length, encoders.clip_max_length
    prompt = "a red circle and a red square"
    mask = np.zeros((40, 30), np.float32)
    mask[:, :15] = 1.0
    tm = token_masks(encoders, prompt, {"red square": mask}, H)
    assert tm.shape == (H, H, lt + lc + 1)
    marked = set(np.nonzero(tm.max(axis=(0, 1)))[0])
    t5_toks = encoders.t5_tokenizer.convert_ids_to_tokens(encoders.t5_tokenizer(prompt)["input_ids"])
    clip_toks = encoders.clip_tokenizer.convert_ids_to_tokens(encoders.clip_tokenizer(prompt)["input_ids"])
    i, j = t5_toks.index("\u2581square"), clip_toks.index("square</w>")
    assert t5_toks[i - 1] == "\u2581red" and clip_toks[j - 1] == "red</w>" and clip_toks[0].startswith("<|start")
    assert marked == {i - 1, i, lt + j - 1, lt + j}
    assert t5_toks.index("\u2581red") < i - 1  # the first 'red' exists and is not marked
    np.testing.assert_array_equal(tm[..., i], load_mask(mask, H))  # the mask itself, resized
    np.testing.assert_array_equal(tm[:, :8, i], 1.0)
    np.testing.assert_array_equal(tm[:, 8:, i], 0.0)

    center = token_masks(encoders, "a blue square in the center", {"center": np.ones((4, 4))}, 8)
    pieces = encoders.t5_tokenizer.convert_ids_to_tokens(encoders.t5_tokenizer("center", add_special_tokens=False)
                                                         ["input_ids"])
    assert len(pieces) > 1  # the shapes sentencepiece splits "center"
    assert (center[0, 0, :lt] > 0).sum() == len(pieces) and (center[0, 0, lt:] > 0).sum() == 1

    with pytest.raises(ValueError, match="'green square'"):
        token_masks(encoders, prompt, {"green square": mask}, H)
    with pytest.raises(ValueError, match="not in the prompt"):
        token_masks(encoders, prompt, {"squ": mask}, H)  # not a token subsequence
    long = " ".join(["a red circle"] * 12) + " and a blue square"
    with pytest.raises(ValueError, match="limit"):
        token_masks(encoders, long, {"blue square": mask}, H)


def test_masks_from_png_of_any_size_and_boundary_errors(tmp_path):
    """PNGs of any size/aspect resize to the image; RGBA uses alpha; bad masks are named."""
    img = np.zeros((90, 120), np.uint8)
    img[:, :60] = 255
    Image.fromarray(img).save(tmp_path / "left.png")
    m = load_mask(tmp_path / "left.png", 16)
    assert m.shape == (16, 16) and m.dtype == np.float32
    np.testing.assert_allclose(m[:, :8], 1.0) and np.testing.assert_allclose(m[:, 8:], 0.0)
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:5, :, 3] = 255  # top half painted via alpha
    Image.fromarray(rgba).save(tmp_path / "top.png")
    np.testing.assert_allclose(load_mask(tmp_path / "top.png", 4)[:, 0], [1, 1, 0, 0])
    np.testing.assert_allclose(load_mask(np.eye(3, dtype=bool), 6).sum(), 12.0)  # enlarged: area scales by 4
    with pytest.raises(ValueError, match="empty"):
        load_mask(np.zeros((5, 5)), 8, what="'red circle'")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_mask(np.full((5, 5), 3.0), 8)
    with pytest.raises(ValueError, match="2-D"):
        load_mask(np.ones(5), 8)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_mask(tmp_path / "nope.png", 8)
    assert parse_paint(["red circle=a=b.png"]) == {"red circle": "a=b.png"}
    with pytest.raises(ValueError, match="PHRASE=MASK"):
        parse_paint(["red circle"])


# --- in the UNet -------------------------------------------------------------------------


def test_weight_zero_is_exactly_plain_and_adds_no_params(setup):
    """w' = 0 leaves the network output bit-identical; w' > 0 changes it; no new params."""
    model, params, x, c_noise, cond, pww, apply = setup
    plain = apply(params, x, c_noise, cond)
    np.testing.assert_array_equal(apply(params, x, c_noise, {**cond, **pww(0.0)}), plain)
    assert np.abs(apply(params, x, c_noise, {**cond, **pww(1.0)}) - plain).max() > 1e-3
    with_pww = jax.eval_shape(model.init, jax.random.key(0), x, c_noise, {**cond, **pww(1.0)})["params"]
    assert jax.tree.structure(with_pww) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="pww_mask has shape"):
        apply(params, x, c_noise, {**cond, **pww(1.0), "pww_mask": pww(1.0)["pww_mask"][..., :-1]})
    with pytest.raises(ValueError, match="both"):
        apply(params, x, c_noise, {**cond, "pww_weight": np.ones(2, np.float32)})


def test_painted_token_attention_mass_in_region_rises_with_weight(setup, encoders):
    """In every cross-attention layer (16x16 and 8x8), the attention paid to 'red circle'
    by the pixels of its region grows with w'."""
    model, params, x, c_noise, cond, pww, _ = setup
    lt = encoders.t5_max_length

    @jax.jit
    def weights(c):
        _, state = model.apply({"params": params}, x, c_noise, c, mutable=["intermediates"])
        return state["intermediates"]

    masses = []
    for w in (0.0, 0.01, 0.03, 0.1):  # small: at sigma = 20 the mass saturates near 1 by w' ~ 0.4
        c = {**cond, **pww(w)}
        red = c["pww_mask"][0, :, 0].max(0) > 0  # slots painted in column 0: 'red circle' (left half)
        assert 2 <= red.sum() <= 4 and not red[lt - 1] and not red[-1]
        per_layer = {}
        for name, leaf in weights(c).items():
            a = np.asarray(leaf["attn_weights"][0])[0]  # example 0: [heads, Nq, L]
            res = int(np.sqrt(a.shape[1]))
            inside = (np.arange(res * res) % res) < res // 2  # left-half query pixels
            per_layer[name] = a[:, inside][..., red].sum(-1).mean()
        masses.append(per_layer)
    names = sorted(masses[0])
    assert len(names) == 7 and all("cross_attn" in n for n in names)  # 3 at 16x16, 4 at 8x8 (mid included)
    for n in names:
        seq = [m[n] for m in masses]
        assert all(b > a for a, b in zip(seq, seq[1:])) and seq[-1] > seq[0] + 0.05, (n, seq)


def test_unconditional_branch_gets_no_bias(setup):
    """unconditional() zeroes w' and the masks; in a guided (cond ; uncond) batch the
    uncond half equals the plain unconditional output and the cond half its own painted one."""
    model, params, x, c_noise, cond, pww, apply = setup
    painted = {**cond, **pww(1.0)}
    u = unconditional(painted)
    assert not np.any(u["pww_weight"]) and not np.any(u["pww_mask"])
    t5_only = select_encoders(painted, use_t5=True, use_clip=False)
    lt = cond["t5"].shape[1]
    assert np.any(t5_only["pww_mask"][..., :lt]) and not np.any(t5_only["pww_mask"][..., lt:])
    both = jax.tree.map(lambda a, b: np.concatenate([a, np.asarray(b)]), painted, u)
    out = apply(params, np.concatenate([x, x]), np.concatenate([c_noise, c_noise]), both)
    np.testing.assert_allclose(out[2:], apply(params, x, c_noise, unconditional(cond)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:2], apply(params, x, c_noise, painted), rtol=1e-5, atol=1e-5)
    assert np.abs(out[:2] - apply(params, x, c_noise, cond)).max() > 1e-3


def test_superresolution_stage_is_painted_too(encoders):
    """SR stages share the UNet: their cross-attention takes the bias."""
    model = build_model(dict(TINY, lowres_cond=True))
    cond = jax.device_get(jax.jit(encoders.encode)(encoders.params, encoders.tokenize(PROMPTS[:1])))
    x = np.random.default_rng(3).normal(size=(1, H, H, 3)).astype(np.float32)
    low, c, aug = x[:, ::4, ::4], np.zeros((1,), np.float32), np.zeros((1,), np.float32)
    params = random_params(model, x, c, cond, lowres=low, aug_level=aug)
    apply = jax.jit(lambda cd: model.apply({"params": params}, x, c, cd, lowres=low, aug_level=aug))
    left, right = halves(32)  # masks at another resolution than the image: pooled
    pww = lambda w: pww_cond(encoders, PROMPTS[:1], {"red circle": left, "blue square": right}, 32, weight=w)
    assert np.abs(apply({**cond, **pww(1.0)}) - apply({**cond, **pww(0.0)})).max() > 1e-3


# --- through the jitted sampler ----------------------------------------------------------


class CountingModel:
    """Counts traces: Python runs `apply` only while jax traces the sampler."""

    def __init__(self, model):
        self.model, self.traces = model, 0

    def apply(self, *args, **kwargs):
        self.traces += 1
        return self.model.apply(*args, **kwargs)


def test_sampler_weight_zero_is_plain_and_new_paintings_do_not_retrace(setup, encoders):
    """Guided EDM sampling with pww keys at w' = 0 is bit-identical to plain sampling; the
    jitted Sampler takes new masks, weights and prompts without retracing."""
    model, params, x, c_noise, cond, pww, _ = setup
    counting = CountingModel(model)
    sampler = Sampler(counting, encoders, image_size=H, steps=2, sampler="euler")
    a = sampler(params, PROMPTS, guidance=2.0, seed=0, extra_cond=pww(1.0))
    traces = counting.traces
    assert traces > 0
    left, right = halves()
    prompts = ["a blue square and a red circle", "a green triangle"]
    other = pww_cond(encoders, prompts, [{"red circle": right, "blue square": left}, {"green triangle": left}], H,
                     weight=[0.5, 2.0])
    b = sampler(params, prompts, guidance=2.0, seed=0, extra_cond=other)
    assert counting.traces == traces, "a new painting, weight or prompt retraced the sampler"
    assert np.abs(a.astype(int) - b).max() > 0

    sigmas = edm.karras_sigmas(2, 0.002, 80.0)
    noise = jax.random.normal(jax.random.key(0), (2, H, H, 3)) * sigmas[0]

    @jax.jit
    def run(c):
        den = edm.guided_denoiser(make_model_fn(model, params, 0.5), c, unconditional(c), 2.0)
        return edm.euler_sample(den, noise, sigmas)

    plain = run(cond)
    np.testing.assert_array_equal(run({**cond, **pww(0.0)}), plain)
    assert np.abs(run({**cond, **pww(1.0)}) - plain).max() > 1e-3


# --- interfaces --------------------------------------------------------------------------


def test_placement_experiment_smoke(tmp_path):
    """The evaluation runs end to end and writes its tables; its detector finds rendered objects."""
    spec = importlib.util.spec_from_file_location("pww_placement", REPO / "experiments" / "pww_placement.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    from ediff_jax.data.shapes import Scene, ShapeObject, render_scene

    scene = Scene((ShapeObject("red", "circle", 0.25, 0.7, 0.3), ShapeObject("orange", "square", 0.7, 0.3, 0.3)))
    img = render_scene(scene, 32)
    for obj in scene.objects:
        cx, cy = exp.detect(img, obj.color)
        assert abs(cx - obj.cx) < 0.03 and abs(cy - obj.cy) < 0.03
    assert exp.detect(img, "blue") is None
    rows = exp.main(["--smoke", "--out", str(tmp_path), "--pww_weight", "0", "1"])
    assert [r["pww_weight"] for r in rows] == [0.0, 1.0] and [r["painting"] for r in rows] == ["no", "yes"]
    csv_text = (tmp_path / "placement.csv").read_text().splitlines()
    assert csv_text[0].startswith("pww_weight,painting") and len(csv_text) == 3
    assert "placement_accuracy" in (tmp_path / "placement.md").read_text()


def test_cli_accepts_paint_and_hyphenated_weight(tmp_path):
    """--paint and --pww-weight parse; a missing mask file is a one-line error, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "ediff_jax.sample", f"--workdir={tmp_path}", "--prompt", "a red circle",
         "--paint", "red circle=missing_mask.png", "--pww-weight", "0.4", f"--out={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )
    assert result.returncode != 0
    assert "missing_mask.png" in result.stderr and "Traceback" not in result.stderr, result.stderr


# --- on a MultiDiffusion canvas (issue #17: features compose) -----------------------------


@pytest.mark.parametrize("circular", [False, True])
def test_canvas_painting_conditions_each_crop_on_its_own_crop_of_the_masks(setup, encoders, circular):
    """The canvas denoiser with a canvas-sized painting equals a crop-by-crop reference (each view
    guided with its own crop of the masks, wrapping around a circular canvas, then averaged), and
    crops that do not overlap the painted region are conditioned exactly as without painting."""
    from ediff_jax.multidiffusion import Tiling, canvas_denoiser

    model, params, _, _, _, _, _ = setup
    prompt = [PROMPTS[0]]
    cond = jax.device_get(jax.jit(encoders.encode)(encoders.params, encoders.tokenize(prompt)))
    # views at columns 0, 8, 16 (and 24, across the seam, when circular)
    tiling = Tiling(H, 2 * H, H, H // 2, circular)
    painted = np.zeros((H, 2 * H), np.float32)
    painted[:, 3 * H // 2:] = 1.0  # columns 24-31: only the views from column 16 on overlap it
    paint = pww_cond(encoders, prompt, {"red circle": painted}, (H, 2 * H), weight=3.0)
    assert paint["pww_mask"].shape[1:3] == (H, 2 * H)
    model_fn = make_model_fn(model, params, 0.5)
    x = np.random.default_rng(2).normal(size=(1, H, 2 * H, 3)).astype(np.float32) * 20.0
    sigma = np.float32(20.0)
    fused = jax.jit(lambda x, c: canvas_denoiser(model_fn, c, tiling, guidance=2.0)(x, sigma))
    got, plain = np.asarray(fused(x, {**cond, **paint})), np.asarray(fused(x, cond))

    total, count = np.zeros_like(x), np.zeros_like(x)
    for top, left in np.asarray(tiling.views):
        cols = (left + np.arange(H)) % (2 * H)
        c = {**cond, **paint, "pww_mask": paint["pww_mask"][:, top:top + H][:, :, cols]}
        d = edm.guided_denoiser(model_fn, c, unconditional(c), 2.0)(x[:, top:top + H][:, :, cols], sigma)
        total[:, top:top + H, cols] += np.asarray(d)
        count[:, top:top + H, cols] += 1
    np.testing.assert_allclose(got, total / count, atol=2e-5)
    unpainted = slice(H // 2, H) if circular else slice(0, H)  # covered only by views that miss the painting
    np.testing.assert_allclose(got[:, :, unpainted], plain[:, :, unpainted], atol=1e-6)
    assert np.abs(got[:, :, 3 * H // 2:] - plain[:, :, 3 * H // 2:]).max() > 1e-3


def test_canvas_painting_with_region_prompts(setup, encoders):
    """With region prompts each prompt row takes the painted phrases it contains (rows: the
    prompts, then each region prompt per prompt); a phrase in no prompt is refused; on the
    sampler, w' = 0 is exactly the unpainted canvas and w' > 0 changes it."""
    from ediff_jax.multidiffusion import MultiDiffusionSampler
    from ediff_jax.multidiffusion.sampler import canvas_paint_cond

    model, params, _, _, _, _, _ = setup
    size = (H, 2 * H)
    region = np.zeros(size, np.float32)
    region[:, H:] = 1.0
    regions = [("a green triangle", region)]
    paint = {"green triangle": region, "red circle": 1.0 - region}
    # Row order, with two prompts and two regions: the prompts, then each region prompt once per prompt.
    left = 1.0 - region
    two = canvas_paint_cond(encoders, [PROMPTS[0], "a purple circle"], [*regions, ("a yellow square", left)],
                            {**paint, "yellow square": left}, size, 1.0)["pww_mask"]
    expected = [token_masks(encoders, PROMPTS[0], {"red circle": left}, size),
                np.zeros_like(two[0]),  # "a purple circle" has none of the painted phrases
                *[token_masks(encoders, "a green triangle", {"green triangle": region}, size)] * 2,
                *[token_masks(encoders, "a yellow square", {"yellow square": left}, size)] * 2]
    assert two.shape[0] == 6 and all(np.abs(m).sum() > 0 for i, m in enumerate(expected) if i != 1)
    for row, want in zip(two, expected):
        np.testing.assert_array_equal(row, want)
    extra = canvas_paint_cond(encoders, [PROMPTS[0]], regions, paint, size, 1.0)
    with pytest.raises(ValueError, match=r"\['purple star'\] occur in neither the prompt nor any --region"):
        canvas_paint_cond(encoders, [PROMPTS[0]], regions, {"purple star": region}, size, 1.0)

    sampler = MultiDiffusionSampler(model, encoders, image_size=H, height=H, width=2 * H, stride=H // 2, steps=2,
                                    sampler="euler")
    run = lambda w: sampler(params, [PROMPTS[0]], regions=regions, guidance=2.0, seed=0,
                            extra_cond=None if w is None else {**extra, "pww_weight": np.full((2,), w, np.float32)})
    plain, zero, strong = run(None), run(0.0), run(3.0)
    np.testing.assert_array_equal(zero, plain)
    assert np.abs(strong.astype(int) - plain).max() > 0
    with pytest.raises(ValueError, match=r"extra_cond\['pww_mask'\] has \(1,\) rows; it needs one per prompt row"):
        sampler(params, [PROMPTS[0]], regions=regions, extra_cond={k: v[:1] for k, v in extra.items()})
