"""MultiDiffusion: each test names the property it pins down and the bug it would catch.

Geometry and fusion are checked against brute force (pixel coverage, a direct
least-squares solve); the canvas denoiser against plain sampling and against the original
algorithm's Python loop over views, with a small random UNet; regions with toy denoisers
whose outputs say which prompt and which input produced them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax import edm
from ediff_jax.models import build_model
from ediff_jax.multidiffusion import (
    STRATEGIES,
    MultiDiffusionSampler,
    Tiling,
    bootstrap_sigma,
    box_mask,
    check_masks,
    crop_views,
    fuse,
    fuse_batched,
    get_views,
    load_mask,
    map_views,
    multidiffusion_denoiser,
    parse_region,
    region_denoiser,
    evaluations_per_call,
    gaussian_tile_weights,
    shifted_views,
    tiled_denoiser,
)
from ediff_jax.multidiffusion.strategies import shift_offset, shifted_num_views

TINY = dict(name="unet", channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            cross_attn_resolutions=(8,), num_heads=2, context_dim=32)
WIN = 16


def jit_fuse(crops, views, height, width, weights=None, circular=False, batched=False):
    """fuse / fuse_batched compiled once (eager execution compiles every op separately)."""
    fn = fuse_batched if batched else fuse
    return jax.jit(lambda c, w: fn(c, np.asarray(views), height, width, w, circular=circular))(crops, weights)


def covered(views, window, height, width):
    count = np.zeros((height, width), int)
    for top, left in views:
        cols = (left + np.arange(window[1])) % width
        count[top:top + window[0], cols] += 1
    return count


# --------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------


def test_views_cover_every_pixel_for_awkward_sizes():
    """For every canvas size and stride (incl. size - window not a multiple of the stride):
    all views lie inside the canvas, every pixel is covered, the last row/column of views
    touches the bottom/right edge, consecutive offsets are at most one stride apart, and no
    view repeats. Dropping the edge-aligned last view (the original code) leaves pixels
    uncovered and fails here."""
    for window in [(4, 4), (5, 3)]:
        for height in range(window[0], window[0] + 9):
            for width in range(window[1], window[1] + 13):
                for sh in range(1, window[0] + 1):
                    for sw in range(1, window[1] + 1):
                        views = get_views(height, width, window, (sh, sw))
                        assert views.dtype == np.int32 and views.shape[1] == 2
                        assert len({tuple(v) for v in views}) == len(views)
                        assert views.min() >= 0
                        assert (views[:, 0] + window[0]).max() == height
                        assert (views[:, 1] + window[1]).max() == width
                        assert np.all(covered(views, window, height, width) >= 1)
                        for axis, step in ((0, sh), (1, sw)):
                            offsets = np.unique(views[:, axis])
                            assert offsets[0] == 0 and np.all(np.diff(offsets) <= step)


def test_circular_views_wrap_and_cover():
    """Circular views start every `stride` columns up to the width (so some run past
    width - window and wrap), cover every pixel, and stay inside the canvas vertically."""
    for width in range(8, 30):
        for stride in range(1, 9):
            views = get_views(12, width, 8, stride, circular=True)
            lefts = np.unique(views[:, 1])
            np.testing.assert_array_equal(lefts, np.arange(0, width, stride))
            assert np.all(covered(views, (8, 8), 12, width) >= 1)
            assert (views[:, 0] + 8).max() == 12


@pytest.mark.parametrize("args, match", [
    ((12, 40, 16, 4), "canvas height 12 is smaller than the model's window height 16.*height >= 16"),
    ((16, 10, 16, 4), "canvas width 10 is smaller.*width >= 16"),
    ((16, 40, 16, 0), r"stride \(height\) must be positive; got 0. Use 1 <= stride <= 16"),
    ((16, 40, 16, (4, -2)), r"stride \(width\) must be positive"),
    ((16, 40, 16, 17), "larger than the window.*uncovered. Use 1 <= stride <= 16"),
])
def test_bad_geometry_names_problem_and_fix(args, match):
    with pytest.raises(ValueError, match=match):
        get_views(*args)
    with pytest.raises(ValueError, match=match):
        Tiling(*args)


# --------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------


def test_fuse_is_the_least_squares_minimiser():
    """fuse = argmin_J sum_i sum_p W_i(p) (J(p) - crop_i(p))^2, solved directly with
    np.linalg.lstsq (rows sqrt(W) * e_p, targets sqrt(W) * crop). A plain mean, a weight
    applied once instead of in both sums, or a crop scattered to the wrong offset fails."""
    rng = np.random.default_rng(0)
    height, width, window, c = 5, 7, (3, 4), 2
    views = get_views(height, width, window, (2, 2))
    crops = rng.normal(size=(len(views), *window, c)).astype(np.float32)
    weights = rng.uniform(0.1, 2.0, size=(len(views), *window, 1)).astype(np.float32)
    pixel, value, weight = [], [], []  # one least-squares row per (crop, pixel it covers)
    for (top, left), crop_i, w_i in zip(views, crops, weights):
        for y in range(window[0]):
            for x in range(window[1]):
                pixel.append((top + y) * width + left + x)
                value.append(crop_i[y, x])
                weight.append(w_i[y, x, 0])
    onehot = np.eye(height * width)[pixel]
    value, sqrt_w = np.stack(value), np.sqrt(np.asarray(weight))[:, None]
    solve = lambda a, b: np.linalg.lstsq(a, b, rcond=None)[0].reshape(height, width, c)
    np.testing.assert_allclose(jit_fuse(crops, views, height, width, weights), solve(sqrt_w * onehot, sqrt_w * value),
                               rtol=1e-5, atol=1e-5)
    # weights=None: unit weights, the plain mean of the covering crops.
    np.testing.assert_allclose(jit_fuse(crops, views, height, width), solve(onehot, value), rtol=1e-5, atol=1e-5)


def test_fuse_of_consistent_crops_is_the_canvas_and_checks_bounds():
    """Crops cut from one canvas fuse back to it exactly, batched and circular alike; a view
    that does not fit is an error rather than an update XLA would silently drop."""
    x = np.random.default_rng(0).normal(size=(2, 10, 23, 3)).astype(np.float32)
    for circular in (False, True):
        tiling = Tiling(10, 23, (4, 5), 3, circular=circular)
        crops = jax.jit(lambda x: crop_views(x, tiling))(x)
        np.testing.assert_array_equal(jit_fuse(crops, tiling.views, 10, 23, circular=circular, batched=True), x)
    with pytest.raises(ValueError, match="do not fit a 10x23 canvas"):
        fuse(np.zeros((1, 4, 5, 3), np.float32), np.array([[0, 19]]), 10, 23)


def test_crop_straddling_the_seam_fuses_back_to_the_right_columns():
    """Circular: the crop at left = 10 of a 12-wide canvas holds columns 10, 11, 0, 1, and
    fusing it alone writes its columns there (and nothing elsewhere)."""
    tiling = Tiling(4, 12, 4, 2, circular=True)
    assert [0, 10] in tiling.views.tolist()
    canvas = np.broadcast_to(np.arange(12.0, dtype=np.float32)[None, None, :, None], (1, 4, 12, 1))
    crops = jax.jit(lambda x: crop_views(x, tiling))(canvas)
    seam = tiling.views.tolist().index([0, 10])
    np.testing.assert_array_equal(crops[seam, 0, 0, :, 0], [10, 11, 0, 1])
    values = np.broadcast_to(np.arange(1.0, 5.0, dtype=np.float32)[None, None, :, None], (1, 4, 4, 1))  # columns 1..4
    out = jit_fuse(values, np.array([[0, 10]]), 4, 12, circular=True)
    np.testing.assert_array_equal(out[0, :, 0], [3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2])


# --------------------------------------------------------------------------------------
# The canvas denoiser with a real (tiny, random) UNet
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    """A random tiny UNet as a guided denoiser D(x, sigma) with batch-1 text conditioning.

    Parameters are drawn from their shapes (no init to compile): fan-in-scaled kernels,
    norm scales near 1, nothing zero (a zero output layer would hide crop bugs).
    """
    model = build_model(TINY)
    rng = np.random.default_rng(0)  # numpy draws: no per-shape compilation
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    cond = dict(t5=normal(1, 5, 12), t5_mask=jnp.ones((1, 5)), clip=normal(1, 4, 10), clip_mask=jnp.ones((1, 4)),
                clip_pooled=normal(1, 10))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, WIN, WIN, 3)), jnp.zeros((1,)), cond)

    def draw(path, leaf):
        if leaf.ndim >= 2:
            return normal(*leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        return (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.2 * normal(*leaf.shape)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    model_fn = edm.denoiser_from_network(lambda xs, cn, c: model.apply({"params": params}, xs, cn, c), 0.5)
    uncond = jax.tree.map(jnp.zeros_like, cond)
    return edm.guided_denoiser(model_fn, cond, uncond, 2.0)


def test_one_view_reproduces_plain_sampling(unet):
    """A canvas the size of the window has one view (weight 1), so MultiDiffusion must
    reproduce plain sampling: one denoiser evaluation bit for bit, and a whole Heun run of
    the same noise up to float32 reassociation (XLA fuses the two loop bodies differently;
    a misplaced crop or a wrong weight would be off by O(1), not 1e-4)."""
    sigmas = edm.karras_sigmas(3)
    x = np.random.default_rng(1).normal(size=(1, WIN, WIN, 3)).astype(np.float32) * sigmas[0]
    tiling = Tiling(WIN, WIN, WIN, 4)
    assert tiling.num_views == 1
    canvas_denoiser = multidiffusion_denoiser(unet, tiling)
    np.testing.assert_array_equal(jax.jit(canvas_denoiser)(x, sigmas[0]), jax.jit(unet)(x, sigmas[0]))
    # DPM-Solver++(2M) too: its history (the previous step's D) lives on the fused canvas.
    for sample in (edm.heun_sample, edm.dpmpp_2m_sample):
        plain = jax.jit(lambda x: sample(unet, x, sigmas))(x)
        canvas = jax.jit(lambda x: sample(canvas_denoiser, x, sigmas))(x)
        np.testing.assert_allclose(canvas, plain, rtol=0, atol=1e-4)
        assert np.abs(np.asarray(plain)).max() > 0.1


@pytest.fixture(scope="module")
def canvas_case(unet):
    tiling = Tiling(WIN, 44, WIN, 8)  # 44 - 16 is not a multiple of 8: the last view is edge-aligned
    x = np.random.default_rng(2).normal(size=(1, WIN, 44, 3)).astype(np.float32) * 3.0
    sigma = jnp.float32(3.0)
    fused = jax.jit(multidiffusion_denoiser(unet, tiling))(x, sigma)
    return tiling, x, sigma, fused


def test_vmapped_views_equal_the_python_loop(unet, canvas_case):
    """The vmapped denoiser equals the original algorithm: one denoiser call per view in a
    Python loop, accumulating value and count per pixel (numpy), then value / count."""
    tiling, x, sigma, fused = canvas_case
    assert tiling.views[:, 1].tolist() == [0, 8, 16, 24, 28]
    one = jax.jit(unet)
    value, count = np.zeros(x.shape, np.float64), np.zeros(x.shape, np.float64)
    for top, left in tiling.views:
        d = one(x[:, top:top + WIN, left:left + WIN], sigma)
        value[:, top:top + WIN, left:left + WIN] += np.asarray(d)
        count[:, top:top + WIN, left:left + WIN] += 1
    np.testing.assert_allclose(fused, value / count, rtol=1e-5, atol=1e-5)


def test_chunked_equals_unchunked(unet, canvas_case):
    """Chunks change memory, not the result: 5 views in chunks of 2 run as a scan over 3
    chunks whose last evaluates a single crop (the `lax.cond` tail of `map_views`)."""
    tiling, x, sigma, fused = canvas_case
    chunked = jax.jit(multidiffusion_denoiser(unet, tiling, chunk_size=2))(x, sigma)
    np.testing.assert_allclose(chunked, fused, rtol=1e-5, atol=1e-5)


def test_map_views_runs_every_item_exactly_once_in_order():
    """For every chunk size (dividing N or not, larger than N) each item is evaluated once
    (no padded slot runs) and outputs come back in item order, pytrees included."""
    calls = []

    def fn(item):
        i, v = item
        jax.debug.callback(lambda j: calls.append(int(j)), i)
        return {"i": i * 2, "v": v + 1.0}

    xs = (np.arange(13), np.ones((13, 2), np.float32))
    for chunk in (None, 1, 4, 5, 20):  # one call; scan; tail of 1; tail of 3; one call
        calls.clear()
        out = jax.jit(lambda xs: map_views(fn, xs, chunk))(xs)
        jax.effects_barrier()
        assert sorted(calls) == list(range(13)), chunk
        np.testing.assert_array_equal(out["i"], np.arange(13) * 2)
        np.testing.assert_array_equal(out["v"], 2.0)


def test_denoiser_is_called_once_per_view_per_evaluation():
    """Counted from inside the compiled program: each fused evaluation runs the crop
    denoiser exactly num_views times, however it is chunked."""
    calls = []

    def toy(x, sigma):
        jax.debug.callback(lambda crop: calls.append(crop.shape), x)  # unrolled over vmapped crops
        return x * 0.5

    tiling = Tiling(8, 30, 8, 4)
    x = np.ones((2, 8, 30, 3), np.float32)
    for chunk in (None, 3):
        calls.clear()
        jax.block_until_ready(jax.jit(multidiffusion_denoiser(toy, tiling, chunk_size=chunk))(x, 1.0))
        jax.effects_barrier()
        assert calls == [(2, 8, 8, 3)] * tiling.num_views and tiling.num_views == 7


# --------------------------------------------------------------------------------------
# Regions and bootstrapping
# --------------------------------------------------------------------------------------


def prompt_id_denoiser(num_prompts):
    """Rows of prompt k (prompt-major batch) predict the constant k: the fused canvas then
    shows which prompt owns each pixel."""

    def denoise(x, sigma):
        b = x.shape[0] // num_prompts
        ids = jnp.repeat(jnp.arange(num_prompts, dtype=x.dtype), b)
        return jnp.broadcast_to(ids[:, None, None, None], x.shape)

    return denoise


def test_region_masks_weight_their_prompts():
    """Inside a region only its prompt counts, outside only the background's, and where
    two regions overlap their predictions are averaged (weights 1 and 1, background 0)."""
    height, width = 8, 24
    masks = np.stack([box_mask(height, width, 0, 0, 8, 10), box_mask(height, width, 0, 6, 8, 14)])
    tiling = Tiling(height, width, 8, 4)
    denoise = region_denoiser(prompt_id_denoiser(3), tiling, masks, rng=jax.random.key(0))
    out = np.asarray(jax.jit(denoise)(np.zeros((2, height, width, 3), np.float32), 1.0))
    np.testing.assert_allclose(out[:, :, :6], 1.0)
    np.testing.assert_allclose(out[:, :, 6:10], 1.5)
    np.testing.assert_allclose(out[:, :, 10:14], 2.0)
    np.testing.assert_allclose(out[:, :, 14:], 0.0)


def flip_denoiser(x, sigma):
    """Mirrors each crop left-right: a crop's left half reports what its right half held."""
    return x[:, :, ::-1]


def test_bootstrapping_only_in_the_first_fraction_of_steps():
    """With fraction 0.2 of 10 steps, the evaluations at sigma_0 and sigma_1 are
    bootstrapped and none from sigma_2 on: the output differs from the un-bootstrapped one
    exactly there. The region prompt (mask = left half) then sees, right of its mask, a
    constant colour in [-1, 1] plus sigma-scaled noise, which the mirror brings into view."""
    sigmas = np.asarray(edm.karras_sigmas(10))
    threshold = bootstrap_sigma(sigmas, 0.2)
    assert threshold == sigmas[2] and bootstrap_sigma(sigmas, 0.0) == math.inf
    tiling = Tiling(8, 8, 8, 2)
    masks = box_mask(8, 8, 0, 0, 8, 4)[None]
    x = np.zeros((1, 8, 8, 3), np.float32)
    make = lambda above: jax.jit(region_denoiser(flip_denoiser, tiling, masks, rng=jax.random.key(3),
                                                 bootstrap_above=above))
    boot, plain = make(threshold), make(math.inf)
    for i, sigma in enumerate(sigmas[:-1]):
        differs = bool(np.any(np.asarray(boot(x, sigma)) != np.asarray(plain(x, sigma))))
        assert differs == (i < 2), (i, sigma)
    # Content: at a tiny sigma the bootstrapped background is one colour per channel.
    left = np.asarray(make(0.0)(x, 1e-4))[0, :, :4]  # mirrored right half of the region crop
    colour = left.mean(axis=(0, 1))
    assert np.all(np.abs(colour) <= 1.0) and np.abs(colour).max() > 1e-2
    np.testing.assert_allclose(left, np.broadcast_to(colour, left.shape), atol=1e-3)


def test_bad_masks_fail_at_the_boundary():
    """Mask problems are ValueErrors naming the region and the fix, raised before tracing
    (the sampler never reaches its model or encoders, here None)."""
    with pytest.raises(ValueError, match=r"'a red circle'\) has shape \(32, 32\).*canvas is 32x64.*Resize"):
        check_masks([np.ones((32, 32))], 32, 64, ["a red circle"])
    with pytest.raises(ValueError, match="covers nothing.*drop the region"):
        check_masks([np.zeros((8, 8))], 8, 8)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        check_masks([np.full((8, 8), 2.0)], 8, 8)
    with pytest.raises(ValueError, match="covers nothing"):
        region_denoiser(flip_denoiser, Tiling(8, 16, 8, 4), np.zeros((1, 8, 16)), rng=jax.random.key(0))
    sampler = MultiDiffusionSampler(None, None, image_size=16, height=16, width=48, stride=8)
    with pytest.raises(ValueError, match="canvas is 16x48"):
        sampler(None, ["a blue square"], regions=[("a red circle", np.ones((16, 16)))])
    with pytest.raises(ValueError, match="smaller than the model's window"):
        MultiDiffusionSampler(None, None, image_size=32, height=16, width=64)
    with pytest.raises(ValueError, match="stride .* must be positive; got 0"):  # 0 is not "use the default"
        MultiDiffusionSampler(None, None, image_size=32, height=32, width=64, stride=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        multidiffusion_denoiser(flip_denoiser, Tiling(8, 16, 8, 4), chunk_size=0)


def test_region_flag_and_mask_png(tmp_path):
    from PIL import Image

    assert parse_region("a red circle=masks/left.png") == ("a red circle", "masks/left.png")
    with pytest.raises(ValueError, match="PROMPT=MASK.png"):
        parse_region("a red circle")
    img = np.zeros((8, 24), np.uint8)
    img[:, :6] = 255
    Image.fromarray(img).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png", 8, 24), img / 255.0)
    with pytest.raises(ValueError, match="canvas is 8x32"):
        load_mask(tmp_path / "m.png", 8, 32)
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "missing.png", 8, 24)


def test_text_to_image_canvas_sampler_end_to_end():
    """The workdir-free sampler with the real (builtin) text encoders and a random UNet:
    background prompts plus two regions on a 16x24 canvas compile into one program,
    return uint8 canvases, and a region's prompt reaches the pixels (changing it changes
    the image; the same inputs give the same image)."""
    from ediff_jax.config_utils import base_config
    from ediff_jax.text.conditioning import load_text_encoders

    encoders = load_text_encoders(base_config().text)
    model = build_model(dict(TINY, context_dim=16, channels=8))
    example = jax.eval_shape(encoders.encode, encoders.params, encoders.tokenize(["a"]))
    cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, WIN, WIN, 3)), jnp.zeros((1,)), cond)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32), shapes["params"])
    sampler = MultiDiffusionSampler(model, encoders, image_size=WIN, height=WIN, width=24, stride=8, steps=2,
                                    sampler="euler", chunk_size=1)
    assert sampler.tiling.num_views == 2
    left, right = box_mask(WIN, 24, 0, 0, WIN, 8), box_mask(WIN, 24, 4, 12, WIN, 24)
    run = lambda red: sampler(params, ["a blue square", "a green triangle"], guidance=2.0, seed=0,
                              regions=[(red, left), ("a yellow circle", right)])
    a, b, c = run("a red circle"), run("a red circle"), run("a purple square")
    assert a.shape == (2, WIN, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)
    # SpotDiffusion's shifted windows in the same sampler: reproducible per seed, moved by the seed
    shifted = MultiDiffusionSampler(model, encoders, image_size=WIN, height=WIN, width=24, steps=2, sampler="euler",
                                    strategy="shifted")
    run = lambda seed: shifted(params, ["a blue square"], guidance=2.0, seed=seed, regions=[("a red circle", left)])
    s0, s0_again, s1 = run(0), run(0), run(1)
    np.testing.assert_array_equal(s0, s0_again)
    assert s0.shape == (1, WIN, 24, 3) and np.any(s0 != s1)


def test_expert_switch_stays_one_branch_across_crops():
    """All crops of a call share the scalar sigma, so `experts.ensemble_denoiser`'s
    `lax.switch` runs one expert per call even vmapped over crops (a per-crop sigma would
    turn it into a select that runs every expert)."""
    from ediff_jax import experts

    ran = []

    def apply_expert(params, x, sigma):
        jax.debug.callback(lambda k, _: ran.append(int(k)), params["k"], x)  # once per crop
        return x * params["scale"]

    stacked = experts.stack_experts([{"k": jnp.int32(0), "scale": jnp.float32(0.5)},
                                     {"k": jnp.int32(1), "scale": jnp.float32(2.0)}])
    ensemble = experts.ensemble_denoiser(apply_expert, stacked, [1.0])
    tiling = Tiling(8, 20, 8, 4)
    canvas = jax.jit(multidiffusion_denoiser(ensemble, tiling, chunk_size=2))
    x = np.ones((1, 8, 20, 3), np.float32)
    for sigma, expert, scale in ((0.5, 0, 0.5), (5.0, 1, 2.0)):
        ran.clear()
        out = canvas(x, sigma)
        jax.effects_barrier()
        assert ran == [expert] * tiling.num_views
        np.testing.assert_allclose(out, scale)


# --------------------------------------------------------------------------------------
# Canvas strategies: overlap, gaussian (Mixture of Diffusers), shifted (SpotDiffusion)
# --------------------------------------------------------------------------------------



def test_gaussian_weights_are_mixture_of_diffusers_and_fuse_by_them():
    """The tile weight is exp(-(i - mid)^2 / n^2 / (2 * 0.01)) per axis; crops that each predict a constant c_i
    fuse to sum_i w_i c_i / sum_i w_i per pixel (numpy reference), not the uniform average."""
    w = gaussian_tile_weights((8, 6))
    ref_h = np.exp(-((np.arange(8) - 3.5) ** 2) / 64 / 0.02)
    ref_w = np.exp(-((np.arange(6) - 2.5) ** 2) / 36 / 0.02)
    np.testing.assert_allclose(w[..., 0], ref_h[:, None] * ref_w[None], rtol=1e-6)
    tiling = Tiling(8, 20, 8, 4)
    values = np.arange(1.0, tiling.num_views + 1)

    def view_value(xc, sigma, view):  # each crop predicts its own index + 1
        index = jnp.argmax(jnp.all(jnp.asarray(tiling.views) == view, axis=1))
        return jnp.broadcast_to(jnp.asarray(values)[index], xc.shape)

    out = np.asarray(jax.jit(tiled_denoiser(view_value, tiling, strategy="gaussian"))(np.zeros((1, 8, 20, 1)), 1.0))
    w8 = gaussian_tile_weights((8, 8))[..., 0]
    num, den = np.zeros((8, 20)), np.zeros((8, 20))
    for i, (top, left) in enumerate(tiling.views):
        num[top:top + 8, left:left + 8] += w8 * values[i]
        den[top:top + 8, left:left + 8] += w8
    np.testing.assert_allclose(out[0, :, :, 0], num / den, rtol=1e-5)
    uniform = np.asarray(jax.jit(tiled_denoiser(view_value, tiling))(np.zeros((1, 8, 20, 1)), 1.0))
    assert np.abs(uniform - out).max() > 0.1  # the weights matter


@pytest.mark.parametrize("height, width, window, circular", [
    (8, 30, 8, False), (8, 32, 8, True), (8, 30, 8, True), (20, 24, 8, False), (8, 8, 8, False)])
def test_shifted_windows_cover_the_canvas_at_every_offset(height, width, window, circular):
    """SpotDiffusion's windows: a fixed count at every offset, every pixel covered, and no overlap where the
    windows wrap a width that they divide (clamped edge windows may overlap their neighbour)."""
    tiling = Tiling(height, width, window, window, circular)
    n = shifted_num_views(tiling)
    for top in range(window):
        for left in range(window):
            views = np.asarray(shifted_views(tiling, jnp.asarray([top, left])))
            assert views.shape == (n, 2)
            count = np.zeros((height, width), int)
            for t, l in views:
                cols = (l + np.arange(window)) % width
                assert 0 <= t <= height - window and (circular or l + window <= width)
                count[t:t + window][:, cols] += 1
            assert count.min() >= 1
            if circular and width % window == 0 and height == window:
                assert count.max() == 1


def test_shifted_offsets_are_reproducible_per_sigma_and_aligned_for_sr():
    tiling = Tiling(16, 64, 16, 16, True)
    key = jax.random.key(4)
    offsets = [tuple(np.asarray(shift_offset(key, s, tiling))) for s in (80.0, 20.0, 5.0, 1.0, 0.1)]
    assert offsets == [tuple(np.asarray(shift_offset(key, s, tiling))) for s in (80.0, 20.0, 5.0, 1.0, 0.1)]
    assert len(set(offsets)) > 1  # the seams move between steps
    assert all(o % 4 == 0 for s in np.linspace(0.1, 80, 20) for o in np.asarray(shift_offset(key, s, tiling, 4)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_evaluates_its_stated_number_of_crops(strategy):
    """Counted from inside the compiled program, as the benchmark counts: one call per crop, and
    `evaluations_per_call` says how many (13 -> 5 on the issue's 32x128 panorama at stride 8)."""
    calls = []

    def toy(x, sigma):
        jax.debug.callback(lambda crop: calls.append(crop.shape), x)
        return x * 0.5

    tiling = Tiling(8, 30, 8, 4)
    x = np.ones((2, 8, 30, 3), np.float32)
    denoise = jax.jit(multidiffusion_denoiser(toy, tiling, chunk_size=3, strategy=strategy, rng=jax.random.key(0)))
    for sigma in (1.0, 2.0):
        calls.clear()
        out = denoise(x, sigma)
        jax.effects_barrier()
        assert calls == [(2, 8, 8, 3)] * evaluations_per_call(tiling, strategy)
        np.testing.assert_allclose(out, 0.5, rtol=1e-6)  # consistent crops fuse to the canvas
    assert evaluations_per_call(Tiling(32, 128, 32, 8), "overlap") == 13
    assert evaluations_per_call(Tiling(32, 128, 32, 8), "shifted") == 5
    assert evaluations_per_call(Tiling(32, 256, 32, 8, True), "shifted") == 8


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_regions_own_their_pixels_under_every_strategy(strategy):
    """Hard region masks: inside a region only its prompt counts and outside only the background's, whatever
    crops the strategy cuts and however it weights them."""
    height, width = 8, 24
    masks = np.stack([box_mask(height, width, 0, 0, 8, 10), box_mask(height, width, 0, 14, 8, 24)])
    tiling = Tiling(height, width, 8, 4)
    denoise = region_denoiser(prompt_id_denoiser(3), tiling, masks, rng=jax.random.key(0), strategy=strategy)
    out = np.asarray(jax.jit(denoise)(np.zeros((2, height, width, 3), np.float32), 1.0))
    np.testing.assert_allclose(out[:, :, :10], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[:, :, 10:14], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 14:], 2.0, rtol=1e-6)


def test_one_window_canvas_is_plain_denoising_under_every_strategy(unet):
    x = np.random.default_rng(1).normal(size=(1, WIN, WIN, 3)).astype(np.float32) * 5.0
    plain = jax.jit(unet)(x, 5.0)
    for strategy in STRATEGIES:
        canvas = multidiffusion_denoiser(unet, Tiling(WIN, WIN, WIN, 4), strategy=strategy, rng=jax.random.key(1))
        np.testing.assert_allclose(jax.jit(canvas)(x, 5.0), plain, rtol=1e-5, atol=1e-5)


# --- Coherence guidance (SyncDiffusion) ---------------------------------------------------------


def _mean_features(images):
    """A linear 'feature network': one feature, the mean of the image (its gradient is 1 / pixels)."""
    return jnp.mean(images, axis=(1, 2, 3))[:, None]


def test_coherence_gradient_closed_form():
    """D(x) = a x and f = the crop mean: each crop's prediction moves by -w sigma^2 a sign(f_i - f_anchor) / P
    (P pixels per crop; EDM's classifier-guidance form), the anchor (first window) not at all; below
    `active_above` the canvas is plain MultiDiffusion."""
    from ediff_jax.multidiffusion import Coherence

    a, w = 0.5, 3.0
    tiling = Tiling(8, 16, 8, 8)  # two disjoint windows: the fusion is the crops themselves
    x = np.concatenate([np.full((1, 8, 8, 3), 1.0), np.full((1, 8, 8, 3), 2.0)], axis=2).astype(np.float32)
    guide = Coherence(_mean_features, w, active_above=1.0)
    denoise = jax.jit(multidiffusion_denoiser(lambda xc, s: a * xc, tiling, coherence=guide))
    out = np.asarray(denoise(x, 2.0))
    p = 8 * 8 * 3
    np.testing.assert_allclose(out[:, :, :8], a * 1.0, rtol=1e-6)  # the anchor: distance 0, no pull
    from ediff_jax.multidiffusion.coherence import SMOOTHING

    gap = a * 2.0 - a * 1.0  # feature distance to the anchor; d/dgap sqrt(gap^2 + s) = gap / sqrt(gap^2 + s)
    pull = w * 2.0**2 * a / p * gap / math.sqrt(gap**2 + SMOOTHING)  # sigma = 2
    np.testing.assert_allclose(out[:, :, 8:], a * 2.0 - pull, rtol=1e-6)  # pulled towards the anchor
    np.testing.assert_allclose(np.asarray(denoise(x, 0.5)), a * x, rtol=1e-6)  # past the guided steps


def test_coherence_costs_one_anchor_crop_while_guided():
    """Counted inside the compiled program: N + 1 crops per guided evaluation (the anchor once more), N after."""
    from ediff_jax.multidiffusion import Coherence, evaluations_per_call

    calls = []

    def toy(x, sigma):
        jax.debug.callback(lambda crop: calls.append(crop.shape), x)
        return x * 0.5

    tiling = Tiling(8, 30, 8, 4)
    n = evaluations_per_call(tiling, "overlap")
    denoise = jax.jit(multidiffusion_denoiser(toy, tiling, coherence=Coherence(_mean_features, 1.0, 1.5)))
    x = np.random.default_rng(0).normal(size=(2, 8, 30, 3)).astype(np.float32)
    for sigma, expected in ((2.0, n + 1), (1.0, n)):
        calls.clear()
        jax.block_until_ready(denoise(x, sigma))
        jax.effects_barrier()
        assert len(calls) == expected


def test_coherence_composes_with_regions_and_is_a_no_op_on_one_window(unet):
    """A one-window canvas is its own anchor: guidance changes nothing, with or without regions; and the
    region denoiser under guidance still gives hard masks' pixels to their prompts (toy denoiser whose
    output is its prompt's index: its features equal the anchor's row for row)."""
    from ediff_jax.multidiffusion import Coherence

    x = np.random.default_rng(1).normal(size=(1, WIN, WIN, 3)).astype(np.float32) * 5.0
    guide = Coherence(_mean_features, 10.0, 1.0)
    plain = jax.jit(unet)(x, 5.0)
    canvas = multidiffusion_denoiser(unet, Tiling(WIN, WIN, WIN, 4), coherence=guide)
    np.testing.assert_allclose(jax.jit(canvas)(x, 5.0), plain, rtol=1e-5, atol=1e-5)
    height, width = 8, 24
    masks = np.stack([box_mask(height, width, 0, 0, 8, 10), box_mask(height, width, 0, 14, 8, 24)])
    denoise = region_denoiser(prompt_id_denoiser(3), Tiling(height, width, 8, 4), masks, rng=jax.random.key(0),
                              coherence=guide)
    out = np.asarray(jax.jit(denoise)(np.zeros((2, height, width, 3), np.float32), 2.0))
    np.testing.assert_allclose(out[:, :, :10], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[:, :, 14:], 2.0, rtol=1e-6)


def test_coherence_bad_input_is_named():
    from ediff_jax.multidiffusion import Coherence, coherence_sigma

    with pytest.raises(ValueError, match="needs a feature network"):
        Coherence(None, 1.0, 1.0)
    with pytest.raises(ValueError, match="positive number"):
        Coherence(_mean_features, -1.0, 1.0)
    sigmas = edm.karras_sigmas(8)
    assert coherence_sigma(sigmas, 3) == pytest.approx(float(sigmas[3]))
    with pytest.raises(ValueError, match="from 1 to the sampler's 8 steps"):
        coherence_sigma(sigmas, 9)


def test_differentiable_features_match_the_uint8_features():
    """The float path of the shipped feature network gives the uint8 path's features (same weights)."""
    from ediff_jax.eval.features import load_differentiable_feature_fn, load_feature_fn

    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    exact = np.asarray(load_feature_fn()(jnp.asarray(images)))
    smooth = np.asarray(load_differentiable_feature_fn()(jnp.asarray(images, jnp.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(smooth, exact, rtol=1e-4, atol=1e-4)
