"""UNet tests: shapes, conditioning semantics (masks, null token), remat and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax.models import build_model, check_image_size
from ediff_jax.models.layers import attention

TINY = dict(name="unet", channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            cross_attn_resolutions=(16, 8), num_heads=2, context_dim=32)
B, H, LT, LC = 2, 16, 5, 4


def make_cond(rng, batch=B):
    k1, k2, k3 = jax.random.split(rng, 3)
    return dict(
        t5=jax.random.normal(k1, (batch, LT, 12)),
        t5_mask=jnp.array([[1, 1, 1, 0, 0]] * batch, jnp.float32),
        clip=jax.random.normal(k2, (batch, LC, 10)),
        clip_mask=jnp.array([[1, 1, 1, 1]] * batch, jnp.float32),
        clip_pooled=jax.random.normal(k3, (batch, 10)),
    )


def randomize(params, rng, scale=0.2):
    """Zero-initialised output layers would hide conditioning bugs: perturb every leaf."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
    model = build_model(TINY)
    x = jax.random.normal(jax.random.key(1), (B, H, H, 3))
    c_noise = jnp.array([-1.0, 0.5])
    cond = make_cond(jax.random.key(2))
    fresh = jax.jit(model.init)(jax.random.key(0), x, c_noise, cond)["params"]
    params = randomize(fresh, jax.random.key(3))
    apply = jax.jit(lambda p, x, c, cond: model.apply({"params": p}, x, c, cond))
    return model, params, x, c_noise, cond, apply, fresh


def test_output_shape_and_zero_init(setup):
    """conv_out is zero-initialised, so a fresh network outputs exactly 0 (EDM's D = c_skip x)."""
    model, _, x, c_noise, cond, apply, fresh = setup
    out = apply(fresh, x, c_noise, cond)
    assert out.shape == (B, H, H, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_padded_tokens_are_ignored(setup):
    """Embeddings at mask == 0 positions must not change the output; valid ones must."""
    model, params, x, c_noise, cond, apply, _ = setup
    base = apply(params, x, c_noise, cond)
    padded = dict(cond, t5=cond["t5"].at[:, 3:].set(100.0))
    np.testing.assert_allclose(apply(params, x, c_noise, padded), base, atol=1e-5)
    valid = dict(cond, t5=cond["t5"].at[:, 1].set(100.0))
    assert np.abs(apply(params, x, c_noise, valid) - base).max() > 1e-3


def test_fully_masked_context_uses_null_token(setup):
    """With every text token masked (both encoders dropped) the output cannot depend on the prompt."""
    model, params, x, c_noise, cond, apply, _ = setup
    other = make_cond(jax.random.key(7))
    drop = lambda c: dict(c, t5_mask=c["t5_mask"] * 0, clip_mask=c["clip_mask"] * 0, clip_pooled=c["clip_pooled"] * 0)
    a = apply(params, x, c_noise, drop(cond))
    b = apply(params, x, c_noise, drop(other))
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_noise_level_changes_output(setup):
    model, params, x, c_noise, cond, apply, _ = setup
    assert np.abs(apply(params, x, c_noise, cond) - apply(params, x, c_noise + 1.0, cond)).max() > 1e-3


def test_remat_matches_plain(setup):
    """Rematerialisation trades compute for memory; values and gradients must be identical."""
    model, params, x, c_noise, cond, _, _ = setup
    remat_model = build_model(dict(TINY, remat=True))

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, x, c_noise, cond) ** 2)

    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat_model, p)))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_bfloat16_compute_close_to_float32(setup):
    """bf16 compute keeps float32 params and output, and stays near the f32 result."""
    model, params, x, c_noise, cond, apply, _ = setup
    bf16 = build_model(dict(TINY, dtype="bfloat16"))
    out = jax.jit(bf16.apply)({"params": params}, x, c_noise, cond)
    ref = apply(params, x, c_noise, cond)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel


def test_superresolution_input_path():
    """SR stages concatenate the upsampled low-res image and embed the augmentation level."""
    model = build_model(dict(TINY, lowres_cond=True))
    x = jnp.zeros((B, H, H, 3))
    low = jax.random.normal(jax.random.key(0), (B, H // 4, H // 4, 3))
    cond = make_cond(jax.random.key(1))
    init = jax.jit(lambda r: model.init(r, x, jnp.zeros((B,)), cond, lowres=low, aug_level=jnp.zeros((B,))))
    params = init(jax.random.key(0))["params"]
    assert params["conv_in"]["kernel"].shape[2] == 6  # 3 noisy + 3 low-res channels
    params = randomize(params, jax.random.key(4))
    apply = jax.jit(lambda p, lo, aug: model.apply({"params": p}, x, jnp.zeros((B,)), cond, lowres=lo, aug_level=aug))
    out_a = apply(params, low, jnp.zeros((B,)))
    out_b = apply(params, low, jnp.ones((B,)))
    out_c = apply(params, -low, jnp.zeros((B,)))
    assert out_a.shape == (B, H, H, 3)
    assert np.abs(out_a - out_b).max() > 1e-3 and np.abs(out_a - out_c).max() > 1e-3
    with pytest.raises(ValueError, match="super-resolution stage"):
        model.apply({"params": params}, x, jnp.zeros((B,)), cond)
    base = build_model(TINY)
    with pytest.raises(ValueError, match="lowres_cond=True"):
        base.init(jax.random.key(0), x, jnp.zeros((B,)), cond, lowres=low, aug_level=jnp.zeros((B,)))


def test_per_level_blocks_and_config_errors():
    model = build_model(dict(TINY, num_res_blocks=(2, 1)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, H, H, 3)), jnp.zeros((1,)),
                            make_cond(jax.random.key(0), 1))
    names = set(shapes["params"])
    assert {"down_0_0", "down_0_1", "down_1_0"} <= names and "down_1_1" not in names
    with pytest.raises(ValueError, match="one count per level"):
        jax.eval_shape(build_model(dict(TINY, num_res_blocks=(1, 1, 1))).init,
            jax.random.key(0), jnp.zeros((1, H, H, 3)), jnp.zeros((1,)), make_cond(jax.random.key(0), 1))
    with pytest.raises(ValueError, match="does not take"):
        build_model(dict(TINY, chanels=8))
    with pytest.raises(ValueError, match="Unknown model"):
        build_model(dict(TINY, name="vit"))
    with pytest.raises(ValueError, match="not divisible by 4"):
        check_image_size(build_model(dict(TINY, channel_mult=(1, 2, 2))), 30)


def test_attention_matches_reference():
    """Softmax((QK^T + bias)/sqrt(d)) over valid keys, against a direct numpy computation."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 3, 2, 4)).astype(np.float32) for _ in range(3))
    k, v = rng.normal(size=(1, 5, 2, 4)).astype(np.float32), rng.normal(size=(1, 5, 2, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 0]], np.float32)
    bias = rng.normal(size=(1, 1, 3, 5)).astype(np.float32)
    out = np.asarray(attention(jnp.array(q), jnp.array(k), jnp.array(v), jnp.array(mask), jnp.array(bias)))
    for h in range(2):
        s = (q[0, :, h] @ k[0, :, h].T + bias[0, 0]) / 2.0
        s = np.where(mask[0] > 0, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[0, :, h], w @ v[0, :, h], rtol=1e-5, atol=1e-6)


def test_coordinate_channels_closed_form():
    """Pixel centres in (-1, 1): y grows downwards, x rightwards, symmetric about the centre."""
    from ediff_jax.models.layers import coordinate_channels

    grid = np.asarray(coordinate_channels(2, 4, 2))
    assert grid.shape == (2, 4, 2, 2)
    np.testing.assert_allclose(grid[0, :, 0, 0], [-0.75, -0.25, 0.25, 0.75])  # y by row
    np.testing.assert_allclose(grid[0, 0, :, 1], [-0.5, 0.5])  # x by column
    np.testing.assert_array_equal(grid[0, :, 1, 0], grid[0, :, 0, 0])  # y constant along a row
    np.testing.assert_array_equal(grid[1], grid[0])


def test_coord_input_feeds_the_coordinates_to_conv_in(setup):
    """coord_input adds two input channels to conv_in and nothing else: with their kernel slice
    zeroed the network equals the plain one with the other weights; with it set, the output changes."""
    model, params, x, c_noise, cond, apply, _ = setup
    coord_model = build_model({**TINY, "coord_input": True})
    fresh = jax.jit(coord_model.init)(jax.random.key(0), x, c_noise, cond)["params"]
    assert fresh["conv_in"]["kernel"].shape[2] == 3 + 2
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    kernel = jnp.concatenate([params["conv_in"]["kernel"], jnp.zeros_like(params["conv_in"]["kernel"][:, :, :2])], 2)
    with_coords = {**params, "conv_in": {**params["conv_in"], "kernel": kernel}}
    coord_apply = jax.jit(lambda p: coord_model.apply({"params": p}, x, c_noise, cond))
    np.testing.assert_allclose(coord_apply(with_coords), apply(params, x, c_noise, cond), atol=1e-5)
    used = {**params, "conv_in": {**params["conv_in"], "kernel": kernel.at[:, :, 3:].set(0.3)}}
    assert float(jnp.abs(coord_apply(used) - apply(params, x, c_noise, cond)).max()) > 1e-3


def test_coord_input_refused_for_stages_trained_on_crops():
    """Crop coordinates differ from whole-image ones at sampling: the config is refused, naming both keys."""
    from ediff_jax.config_utils import base_config
    from ediff_jax.sr import check_sr_config

    c = base_config()
    c.data.image_size, c.sr.lowres_size, c.sr.crop_size, c.model.coord_input = 256, 64, 128, True
    with pytest.raises(ValueError, match="coord_input=True with config.sr.crop_size=128"):
        check_sr_config(c)
    c.model.coord_input = False
    check_sr_config(c)
