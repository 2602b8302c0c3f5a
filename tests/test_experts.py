"""Expert ensemble: selection by sigma, stacking, branching, vmapped training, checkpoints."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax import edm, experts, training
from ediff_jax.checkpoints import CheckpointMismatchError
from ediff_jax.config_utils import expert_schedule, load_config
from ediff_jax.sampling import make_model_fn
from ediff_jax.workdirs import load_workdir

REPO = Path(__file__).resolve().parents[1]
BOUNDS = np.array([0.1, 1.0, 10.0], np.float32)


def test_expert_index_at_boundaries():
    """Expert k serves boundaries[k-1] <= sigma < boundaries[k]; expert 0 is the lowest noise."""
    for k, b in enumerate(BOUNDS):
        below, above = np.nextafter(b, np.float32(0)), b
        assert int(experts.expert_index(jnp.float32(below), BOUNDS)) == k
        assert int(experts.expert_index(jnp.float32(above), BOUNDS)) == k + 1
    assert int(experts.expert_index(jnp.float32(0.002), BOUNDS)) == 0
    assert int(experts.expert_index(jnp.float32(80.0), BOUNDS)) == 3


def test_stack_unstack_round_trip():
    trees = [{"w": jnp.full((2, 3), k), "b": {"c": jnp.arange(3) + k}} for k in range(3)]
    stacked = experts.stack_experts(trees)
    assert stacked["w"].shape == (3, 2, 3) and experts.num_experts(stacked) == 3
    for a, b in zip(experts.unstack_experts(stacked), trees):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(ValueError, match="share one network"):
        experts.stack_experts([trees[0], {"w": trees[1]["w"]}])


def test_bad_boundaries_are_named():
    stacked = experts.stack_experts([{"w": jnp.ones(2)}] * 3)
    apply = lambda p, x, s: x * p["w"][0]
    with pytest.raises(ValueError, match="3 stacked experts need 2 sigma boundaries, found 3"):
        experts.ensemble_denoiser(apply, stacked, BOUNDS)
    with pytest.raises(ValueError, match="strictly ascending"):
        experts.ensemble_denoiser(apply, stacked, [1.0, 0.5])


def test_each_expert_runs_exactly_on_its_steps():
    """Over a Heun trajectory, expert k is called on exactly the sigmas inside its interval."""
    calls = []
    scales = jnp.array([0.5, 0.6, 0.7, 0.8])

    def apply(p, x, sigma):
        jax.debug.callback(lambda k, s: calls.append((int(k), float(s))), p["id"], sigma)
        return x * p["scale"]

    stacked = {"id": jnp.arange(4), "scale": scales}
    denoise = experts.ensemble_denoiser(apply, stacked, BOUNDS)
    sigmas = edm.karras_sigmas(12)
    out = jax.jit(lambda x: edm.heun_sample(denoise, x, sigmas))(jnp.ones((2, 3)))
    jax.block_until_ready(out)
    s = np.asarray(sigmas)
    evaluated = list(s[:-1]) + list(s[1:-1])  # first evaluation at every step; Heun correction unless to 0
    assert len(calls) == len(evaluated)
    for k, sigma in calls:
        lo = BOUNDS[k - 1] if k > 0 else 0.0
        hi = BOUNDS[k] if k < 3 else np.inf
        assert lo <= sigma < hi
    expected = np.bincount(np.searchsorted(BOUNDS, np.array(evaluated), side="right"), minlength=4)
    np.testing.assert_array_equal(np.bincount([k for k, _ in calls], minlength=4), expected)


@pytest.fixture(scope="module")
def exp2(shapes_data_dir):
    c = load_config(str(REPO / "configs/base64.py:size=tiny,experts=2"))
    c.data.data_dir = shapes_data_dir
    c.train.lr, c.train.warmup_steps = 2e-3, 1
    # One UNet level: the ensemble properties do not depend on the network, and compiling
    # vmapped expert steps dominates this file's time.
    c.model.channel_mult, c.model.attn_resolutions, c.model.cross_attn_resolutions = (1,), (), (32,)
    return training.build_experiment(c)


def test_identical_experts_equal_the_single_model(exp2):
    model = exp2.model
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    tokens = exp2.encoders.tokenize(["a red circle", "a blue square"])
    cond = exp2.encoders.encode(exp2.encoders.params, tokens)
    params = jax.jit(model.init)(jax.random.key(1), x, jnp.zeros((2,)), cond)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    single = jax.jit(make_model_fn(model, params, 0.5))
    ensemble = jax.jit(make_model_fn(model, experts.stack_experts([params] * 3), 0.5, boundaries=[0.5, 2.0]))
    for sigma in (0.1, 1.0, 5.0):  # one sigma per expert
        np.testing.assert_array_equal(ensemble(x, jnp.float32(sigma), cond), single(x, jnp.float32(sigma), cond))


def test_guidance_per_expert_closed_form():
    """One guidance scale per expert (highest noise first): with D_cond = 2x and D_uncond = 0, guidance g
    gives 2 g x, so each sigma must see its own expert's g, on one image and on a fused canvas alike."""
    from ediff_jax.multidiffusion import Tiling, multidiffusion_denoiser

    model_fn = lambda x, sigma, cond: x * cond["c"][:, None, None, None]
    x = jnp.ones((1, 8, 20, 3))
    scales = experts.guidance_by_expert(jnp.asarray([5.0, 2.0]), [1.0])
    guided = edm.guided_denoiser(model_fn, {"c": jnp.full((1,), 2.0)}, {"c": jnp.zeros((1,))}, scales)
    canvas = multidiffusion_denoiser(guided, Tiling(8, 20, 8, 4))
    for sigma, g in ((5.0, 5.0), (1.0, 5.0), (0.5, 2.0)):  # expert k serves boundaries[k-1] <= sigma
        np.testing.assert_allclose(guided(x, jnp.float32(sigma)), 2 * g * x)
        np.testing.assert_allclose(canvas(x, jnp.float32(sigma)), 2 * g * x, rtol=1e-6)
    guided2 = edm.guided_denoiser(model_fn, {"c": jnp.full((2,), 2.0)}, {"c": jnp.zeros((1,))}, scales)
    per_sample = guided2(jnp.ones((2, 4, 4, 3)), jnp.asarray([5.0, 0.5]))
    np.testing.assert_allclose(per_sample[:, 0, 0, 0], [10.0, 4.0])
    with pytest.raises(ValueError, match="3 guidance scales need an ensemble of 3 experts; this model has 2"):
        experts.guidance_by_expert(jnp.asarray([1.0, 2.0, 3.0]), [1.0])


def test_guidance_per_expert_reaches_the_samplers(exp2):
    """In the image sampler (painted) and the canvas sampler (with a region prompt), guidance (5, 2) on an
    ensemble whose boundary lies above every sampled sigma equals guidance 2 (every step is the low-noise
    expert's), and below every sigma equals guidance 5; a list of the wrong length is refused."""
    from ediff_jax.multidiffusion import MultiDiffusionSampler
    from ediff_jax.paint_with_words import pww_cond
    from ediff_jax.sampling import Sampler

    model, enc = exp2.model, exp2.encoders
    x = jnp.zeros((1, 32, 32, 3))
    cond = enc.encode(enc.params, enc.tokenize(["a red circle"]))
    params = jax.jit(model.init)(jax.random.key(1), x, jnp.zeros((1,)), cond)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    stacked = experts.stack_experts([params, params])
    prompts = ["a red circle"]
    left = np.zeros((32, 32), np.float32)
    left[:, :16] = 1.0
    paint = pww_cond(enc, prompts, {"red circle": left}, 32, 2.0)
    image = Sampler(model, enc, image_size=32, steps=2, sampler="euler", boundaries=[1e4])
    np.testing.assert_array_equal(image(stacked, prompts, guidance=(5.0, 2.0), extra_cond=paint),
                                  image(stacked, prompts, guidance=2.0, extra_cond=paint))
    with pytest.raises(ValueError, match="guidance has 3 values but an ensemble of 2 experts samples this stage"):
        image(stacked, prompts, guidance=(5.0, 2.0, 1.0))
    canvas = MultiDiffusionSampler(model, enc, image_size=32, height=32, width=48, stride=16, steps=2,
                                   sampler="euler", boundaries=[1e-4])
    right = np.zeros((32, 48), np.float32)
    right[:, 24:] = 1.0
    regions = [("a blue square", right)]
    np.testing.assert_array_equal(canvas(stacked, prompts, regions=regions, guidance=(5.0, 2.0)),
                                  canvas(stacked, prompts, regions=regions, guidance=5.0))


def test_branching_preserves_the_parent(exp2):
    """Children start as exact copies of their parent: the ensemble equals the parent model."""
    state, _ = training.init_train_state(exp2)
    assert experts.num_experts(state.params) == 1
    branched, _ = training.branch_state(exp2, state, 1)
    assert experts.num_experts(branched.params) == 2
    for child in experts.unstack_experts(branched.params) + experts.unstack_experts(branched.opt_state):
        parent = experts.unstack_experts(state.params if "conv_in" in child else state.opt_state)[0]
        jax.tree.map(np.testing.assert_array_equal, child, parent)


def test_vmapped_update_equals_separate_expert_updates(exp2):
    """The E-expert step is E independent single-expert updates (own clipping, own optimizer state).

    Adam's first step is lr * sign(g), which float reordering (batched vs unbatched convs) can
    flip where g ~ 0; so this compares under a clipped SGD, where clipping the global norm over
    all experts (a coupling bug) would change every update.
    """
    import dataclasses

    import optax

    exp2 = dataclasses.replace(exp2, tx=optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0)))
    state, _ = training.init_train_state(exp2)
    state, _ = training.branch_state(exp2, state, 1)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), state.params)
    e, n = 2, 2
    images = jax.random.uniform(jax.random.key(4), (e, n, 32, 32, 3), minval=-1, maxval=1)
    tokens = exp2.encoders.tokenize(["a red circle", "a blue square"] * 2)
    cond = jax.tree.map(lambda x: x.reshape(e, n, *x.shape[1:]), exp2.encoders.encode(exp2.encoders.params, tokens))
    sigma = jnp.array([[0.05, 0.3], [2.0, 40.0]])
    noise = jax.random.normal(jax.random.key(5), images.shape)
    rngs = jax.random.split(jax.random.key(6), e)
    update = training.make_update(exp2)
    args = (params, state.opt_state, state.ema_params, images, cond, sigma, noise, rngs)
    vmapped = jax.jit(jax.vmap(update, in_axes=(0,) * 8 + (None,)))(*args, jnp.int32(3))
    for k in range(e):
        separate = jax.jit(update)(*jax.tree.map(lambda x: x[k], args), jnp.int32(3))
        # Updates have global norm 1e-3; 1e-6 allows float reordering only.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-4, atol=1e-6), vmapped, separate)


def test_uneven_expert_shares_cover_the_batch_once_and_rotate():
    """3 experts at batch 16 (eDiff-I's layout at the reference batch): shares of 6 rows, padded with copies of
    real rows (finite inputs) of weight 0. At every step the rows of weight 1 are the batch, each once; the
    shorter shares rotate, so over 3 steps every expert trains on 16 examples. An even split is unchanged."""
    rows, e = 16, 3
    batch = jnp.arange(rows)
    per_expert = np.zeros(e)
    for step in range(e):
        shares = np.asarray(experts.expert_shares(batch, e, step))
        weight = np.asarray(experts.expert_share_weights(rows, e, step))
        assert shares.shape == weight.shape == (e, 6) and set(np.unique(weight)) == {0.0, 1.0}
        assert sorted(shares[weight == 1].tolist()) == list(range(rows))  # every example once
        assert sorted(weight.sum(1).tolist()) == [5, 5, 6]
        per_expert += weight.sum(1)
    np.testing.assert_array_equal(per_expert, [16, 16, 16])
    even = np.asarray(experts.expert_shares(jnp.arange(12), e, 5))  # the offset is ignored when even
    np.testing.assert_array_equal(even, np.arange(12).reshape(4, 3).T)
    assert experts.expert_share_weights(12, e, 5) is None
    with pytest.raises(ValueError, match="2 rows cannot give each of 3 experts a row"):
        experts.expert_shares(jnp.arange(2), 3)


def test_padded_update_equals_the_update_on_the_real_examples(exp2):
    """Reference: one expert's update on its 3 real examples. Padded to 4 rows, the 4th of weight 0, the
    weighted update is the same, also with grad_accum=2 (micro-batches of 2 and 1 real rows: the
    normalisation is by the share's real examples, not per micro-batch). Clipped SGD as above."""
    import dataclasses

    import optax

    sgd = dataclasses.replace(exp2, tx=optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0)))
    state, _ = training.init_train_state(sgd)  # phase 0: one expert on the stacked axis
    params, opt_state, ema = (jax.tree.map(lambda x: x[0], t) for t in (state.params, state.opt_state, state.ema_params))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
    images = jax.random.uniform(jax.random.key(4), (4, 32, 32, 3), minval=-1, maxval=1)
    cond = exp2.encoders.encode(exp2.encoders.params, exp2.encoders.tokenize(["a red circle", "a blue square"] * 2))
    sigma, noise = jnp.array([0.05, 0.3, 2.0, 40.0]), jax.random.normal(jax.random.key(5), images.shape)
    real = lambda x: x[:3]
    args = (params, opt_state, ema)
    reference = jax.jit(training.make_update(sgd))(*args, real(images), jax.tree.map(real, cond), real(sigma),
                                                   real(noise), jax.random.key(6), jnp.int32(3))
    weight = jnp.array([1.0, 1.0, 1.0, 0.0])
    for accum in (1, 2):
        cfg = exp2.config.copy_and_resolve_references()
        cfg.train.grad_accum = accum
        padded = jax.jit(training.make_update(dataclasses.replace(sgd, config=cfg)))(
            *args, images, cond, sigma, noise, jax.random.key(6), jnp.int32(3), weight)
        np.testing.assert_allclose(padded[3], reference[3], rtol=1e-5)  # the loss: the mean over real rows
        np.testing.assert_allclose(padded[4], reference[4], rtol=1e-4)  # the gradient norm
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), padded[0], reference[0])


def test_boundaries_placed_at_given_sigmas():
    """layout_split_at_sigmas puts the boundaries where asked: the inverse CDF of p(sigma) gives them back,
    and Wan 2.2's SNR form sigma = sigma_data / sqrt(SNR) is one of them."""
    from ediff_jax.config_utils import layout_split_at_sigmas

    p_mean, p_std = 0.0, 1.6
    shared, split = layout_split_at_sigmas([0.5 / 0.1 ** 0.5, 5.0], p_mean, p_std)
    assert shared == ((0.0, 1.0),) and len(split) == 3
    experts.parents_of(split, shared)  # every expert branches from the shared model
    np.testing.assert_allclose(experts.boundaries_from_intervals(split, p_mean, p_std), [0.5 / 0.1 ** 0.5, 5.0],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="ascending"):
        layout_split_at_sigmas([5.0, 1.0], p_mean, p_std)
    with pytest.raises(ValueError, match="almost never samples"):
        layout_split_at_sigmas([1e9], p_mean, p_std)


def test_p_sigma_float64_pair_matches_traced_pair():
    """config_utils' float64 CDF/quantile of p(sigma) (used by configs and loss-mass boundaries, no JAX)
    agree with experts' traced float32 pair, invert each other, and put the median at exp(p_mean)."""
    from ediff_jax.config_utils import p_sigma_cdf, p_sigma_quantile

    p_mean, p_std = -1.2, 1.2
    sigmas = [0.002, 0.05, 0.3, 1.0, 5.22, 80.0]
    qs = [p_sigma_cdf(s, p_mean, p_std) for s in sigmas]
    np.testing.assert_allclose(qs, experts.quantile_of_sigma(np.asarray(sigmas), p_mean, p_std), atol=1e-6)
    np.testing.assert_allclose([p_sigma_quantile(q, p_mean, p_std) for q in qs], sigmas, rtol=1e-9)
    np.testing.assert_allclose(p_sigma_quantile(0.5, p_mean, p_std), np.exp(p_mean), rtol=1e-12)
    np.testing.assert_allclose(p_sigma_quantile(0.9, p_mean, p_std),
                               experts.sigma_at_quantile(0.9, p_mean, p_std), rtol=1e-5)


def test_loss_mass_boundaries_closed_forms():
    """Equal loss in every bucket: the boundaries are p(sigma)'s equal-mass quantiles. Loss in one bucket only:
    every boundary lies inside it, at p(sigma)'s quantiles within the bucket. Gaps in the data are refused."""
    import math
    from statistics import NormalDist

    p_mean, p_std = 0.0, 1.6
    edges = [0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, math.inf]
    thirds = experts.boundaries_from_intervals(((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0)), p_mean, p_std)
    np.testing.assert_allclose(experts.loss_mass_boundaries(edges, [0.3] * 7, 3, p_mean, p_std), thirds, rtol=1e-5)
    phi = lambda s: NormalDist().cdf((math.log(s) - p_mean) / p_std)
    lo, hi = phi(1.0), phi(2.0)
    quartiles = [math.exp(p_mean + p_std * NormalDist().inv_cdf(lo + k * (hi - lo) / 4)) for k in (1, 2, 3)]
    one_bucket = [0, 0, 0, 0, 0.7, 0, 0]
    np.testing.assert_allclose(experts.loss_mass_boundaries(edges, one_bucket, 4, p_mean, p_std), quartiles, rtol=1e-9)
    with pytest.raises(ValueError, match=r"missing or invalid in the sigma buckets \['0.5-1'\]"):
        experts.loss_mass_boundaries(edges, [0.1, 0.1, 0.1, float("nan"), 0.1, 0.1, 0.1], 2, p_mean, p_std)
    with pytest.raises(ValueError, match="edges 0 < ... < inf"):
        experts.loss_mass_boundaries(edges[:-1], [0.1] * 7, 2, p_mean, p_std)


def test_loss_boundaries_from_a_shared_runs_log(tmp_path):
    """configs/shapes_benchmark.py:boundary_loss=true reads the shared run's metrics.jsonl: the bucket losses
    logged in the last 1000 steps up to the branch step (later and earlier lines ignored), split into E experts
    of equal loss mass, straight after the shared phase. Missing data is refused before any training."""
    import json

    from ediff_jax.metrics import read_bucket_losses

    names = ["loss/sigma_0-0.05", "loss/sigma_0.05-0.2", "loss/sigma_0.2-0.5", "loss/sigma_0.5-1", "loss/sigma_1-2",
             "loss/sigma_2-5", "loss/sigma_5-inf"]
    lines = [{"step": 100, "loss": 9.0},  # no buckets: not a training log line
             {"step": 500, **dict(zip(names, [5.0] * 7))},  # before the window (step 1600 - 1000)
             {"step": 1000, **dict(zip(names, [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3]))},
             {"step": 1600, **dict(zip(names, [0.4, 0.1, 0.1, 0.1, 0.3, 0.2, 0.5]))},
             {"step": 1700, **dict(zip(names, [9.0] * 7))}]  # after the branch step
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    edges, losses = read_bucket_losses(tmp_path, 1600)
    assert edges[0] == 0.0 and edges[-1] == float("inf") and edges[1:-1] == [0.05, 0.2, 0.5, 1.0, 2.0, 5.0]
    np.testing.assert_allclose(losses, [0.3, 0.1, 0.1, 0.1, 0.2, 0.2, 0.4])
    c = load_config(f"{REPO / 'configs/shapes_benchmark.py'}:experts=3,branch_from={tmp_path}@1600,steps=4000,"
                    "minutes=0,boundary_loss=true")
    assert c.experts.phase_steps == (1600, 2400) and len(c.experts.phases) == 2
    from ediff_jax.config_utils import validate_config
    validate_config(c)
    np.testing.assert_allclose(experts.boundaries_from_intervals(c.experts.phases[1], c.edm.p_mean, c.edm.p_std),
                               experts.loss_mass_boundaries(edges, losses, 3, c.edm.p_mean, c.edm.p_std), rtol=1e-5)
    with pytest.raises(ValueError, match="logs no per-sigma losses between steps -900 and 100"):
        read_bucket_losses(tmp_path, 100)
    with pytest.raises(FileNotFoundError, match="train the shared phase into that workdir first"):
        load_config(f"{REPO / 'configs/shapes_benchmark.py'}:experts=2,branch_from={tmp_path / 'none'}@1600,"
                    "boundary_loss=true")
    with pytest.raises(ValueError, match="give experts=2 or 3 and branch_from"):
        load_config(f"{REPO / 'configs/shapes_benchmark.py'}:experts=2,boundary_loss=true")


def test_interval_sigmas_and_equal_mass_boundaries():
    p_mean, p_std = -1.2, 1.2
    (b,) = experts.boundaries_from_intervals([(0.0, 0.5), (0.5, 1.0)], p_mean, p_std)
    np.testing.assert_allclose(b, np.exp(p_mean), rtol=1e-6)  # the median of the log-normal
    s = edm.sample_training_sigmas(jax.random.key(0), (200_000,), p_mean, p_std)
    bounds = experts.boundaries_from_intervals([(0, .5), (.5, .75), (.75, 1)], p_mean, p_std)
    np.testing.assert_allclose(np.mean(np.asarray(s)[:, None] < bounds, axis=0), [0.5, 0.75], atol=0.01)
    sig = experts.sample_interval_sigmas(jax.random.key(1), (5000,), (0.5, 0.75), p_mean, p_std)
    assert float(sig.min()) >= bounds[0] * 0.9999 and float(sig.max()) <= bounds[1] * 1.0001


def test_schedule_and_phase_validation():
    phases, steps = expert_schedule(3, 10)
    assert [len(p) for p in phases] == [1, 2, 3] and sum(steps) == 10
    # a branched run counts the source's steps in its shared phase; the later phases split the rest
    assert expert_schedule(3, 10, shared_steps=4) == (phases, (4, 3, 3))
    with pytest.raises(ValueError, match="shorter than the run"):
        expert_schedule(2, 10, shared_steps=10)
    with pytest.raises(ValueError, match="not inside exactly one parent"):
        experts.parents_of([(0.0, 0.6), (0.6, 1.0)], [(0.0, 0.5), (0.5, 1.0)])
    with pytest.raises(ValueError, match="ascending and contiguous"):
        experts.validate_intervals([(0.0, 0.5), (0.6, 1.0)])


@pytest.fixture(scope="module")
def ensemble_workdir(exp2, tmp_path_factory):
    """One uninterrupted 2-phase run (shared, then 2 experts), shared by the tests below."""
    config = exp2.config.copy_and_resolve_references()
    config.sample.steps = 2
    workdir = tmp_path_factory.mktemp("ensemble") / "full"
    state = training.train_and_evaluate(config, workdir)
    return config, workdir, state


def test_ensemble_checkpoint_carries_boundaries_and_is_refused_by_single_config(ensemble_workdir, tmp_path):
    config, workdir, state = ensemble_workdir
    assert experts.num_experts(state.params) == 2
    _, exp, ema = load_workdir(workdir)
    assert exp.boundaries.shape == (1,) and experts.num_experts(ema) == 2
    np.testing.assert_allclose(exp.boundaries, np.exp(config.edm.p_mean), rtol=1e-5)  # median of p(sigma)

    single = config.copy_and_resolve_references()
    single.experts.phases, single.experts.phase_steps = (), ()
    shutil.copytree(workdir, tmp_path / "copy")
    with pytest.raises(CheckpointMismatchError, match="holds an ensemble of 2 experts but the config describes a single"):
        training.train_and_evaluate(single, tmp_path / "copy")


@pytest.mark.slow
def test_run_stopped_at_phase_boundary_resumes_exactly(ensemble_workdir, tmp_path):
    """Stopped at the end of the shared phase and resumed, a run equals the uninterrupted one (these two
    runs skip the MFU count and the final grid, which leave the state alone and the full run covers)."""
    config, _, full = ensemble_workdir
    config = config.copy_and_resolve_references()
    config.train.log_mfu, config.sample.prompts = False, ()
    training.train_and_evaluate(config, tmp_path / "split", stop_after=2)
    resumed = training.train_and_evaluate(config, tmp_path / "split")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), full.params, resumed.params)


@pytest.mark.slow
def test_vmap_unroll_and_scan_expert_steps_agree(exp2):
    """`experts.train_map`: the vmapped, unrolled and lax.map steps are the same math, on an uneven split
    (3 rows for 2 experts: shares of 2, one row of padding) whose padding no metric counts."""
    import dataclasses

    import optax

    sgd = dataclasses.replace(exp2, tx=optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0)))
    state, _ = training.init_train_state(sgd)
    state, _ = training.branch_state(sgd, state, 1)
    tokens = exp2.encoders.tokenize(["a red circle", "a blue square", "a green triangle"])
    batch = {"image": jax.random.uniform(jax.random.key(7), (3, 32, 32, 3), minval=-1, maxval=1), **tokens}
    out = {}
    for mode in ("vmap", "unroll", "scan"):
        cfg = exp2.config.copy_and_resolve_references()
        cfg.experts.train_map = mode
        exp = dataclasses.replace(sgd, config=cfg)
        st = jax.tree.map(jnp.copy, state)
        out[mode] = jax.jit(training.make_train_step(exp, 1))(st, exp.encoders.params, batch)
    for mode in ("vmap", "unroll", "scan"):
        assert float(out[mode][1]["bucket_count"].sum()) == 3.0 and np.isfinite(float(out[mode][1]["loss"]))
    for mode in ("unroll", "scan"):
        np.testing.assert_allclose(out["vmap"][1]["loss"], out[mode][1]["loss"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     out["vmap"][0].params, out[mode][0].params)


# ---------------------------------------------------------------------------------------
# Branching a trained shared model (config.experts.init_from): eDiff-I's recipe, and what
# lets the expert ablation share one shared phase between layouts.
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def warm_started(exp2, tmp_path_factory):
    """A single model trained 2 steps (source), the same run uninterrupted to 4, its warm-started
    continuation to 4, and a 2-expert run branched from the source at step 2.

    No MFU count and no final sample grids: the tests compare states, and ensemble_workdir's run
    covers both for an ensemble (each would trace and compile another program per run here)."""
    root = tmp_path_factory.mktemp("warm_start")
    single = exp2.config.copy_and_resolve_references()
    single.experts.phases, single.experts.phase_steps = (), ()
    single.train.extra_ema_decays = (0.9,)
    single.train.posthoc_ema.gammas, single.train.posthoc_ema.every = (6.94,), 1
    single.train.log_mfu, single.sample.prompts = False, ()
    source = training.train_and_evaluate(single, root / "source", stop_after=2)
    whole = training.train_and_evaluate(single, root / "whole")
    cont = single.copy_and_resolve_references()
    cont.experts.init_from = f"{root / 'source'}@2"
    continued = training.train_and_evaluate(cont, root / "continued")
    branched = exp2.config.copy_and_resolve_references()
    branched.train.extra_ema_decays = (0.9,)
    branched.train.posthoc_ema.gammas, branched.train.posthoc_ema.every = (6.94,), 1
    branched.train.log_mfu, branched.sample.prompts = False, ()
    branched.experts.init_from = f"{root / 'source'}@2"
    at_branch = training.train_and_evaluate(branched, root / "branched", stop_after=2)  # no step: the start state
    listing = sorted(str(p.relative_to(root / "source")) for p in (root / "source").rglob("*"))
    end = training.train_and_evaluate(branched, root / "branched")
    return dict(root=root, single=single, branched=branched, source=source, whole=whole, continued=continued,
                at_branch=at_branch, end=end, source_listing=listing)


@pytest.mark.slow
def test_warm_start_of_one_model_equals_the_uninterrupted_run(warm_started):
    """Without phases, init_from continues the source exactly: every state field, the data stream
    (step 3 reads example 3 x batch), the RNG and the EMA warm-ups, as a resume would."""
    whole, continued = warm_started["whole"], warm_started["continued"]
    assert int(continued.step) == int(whole.step) == 4
    for field in ("params", "ema_params", "extra_emas", "power_emas", "opt_state"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     getattr(whole, field), getattr(continued, field))


@pytest.mark.slow
def test_warm_start_branches_the_shared_model_into_experts(warm_started):
    """The branched run starts as the source's model stacked as phase 0's one expert (params, EMAs, the
    post-hoc power EMA and Adam state), at the source's step; at the phase end it branches into 2 experts
    that then differ, and its post-hoc snapshots reconstruct them; the source workdir is only read."""
    source, start, end = warm_started["source"], warm_started["at_branch"], warm_started["end"]
    assert int(start.step) == 2 and experts.num_experts(start.params) == 1
    for field in ("params", "ema_params", "extra_emas", "power_emas", "opt_state"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), getattr(start, field), getattr(source, field))
    assert int(end.step) == 4 and experts.num_experts(end.params) == 2
    low, high = experts.unstack_experts(end.params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(high)))
    root = warm_started["root"]
    _, exp, ema = load_workdir(root / "branched")
    assert experts.num_experts(ema) == 2 and exp.boundaries.shape == (1,)
    # Post-hoc EMA across the branch: the run's one tracked exponent, asked for at its newest snapshot, is
    # exactly the experts' tracked power EMA (the snapshots are stacked and read back onto 2 experts).
    from ediff_jax.ema import gamma_to_sigma_rel

    _, _, recon = load_workdir(root / "branched", ema_sigma_rel=float(gamma_to_sigma_rel(6.94)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), recon, end.power_emas[0])
    history = sorted((root / "branched" / "config_history").glob("*.json"))
    assert "_step2" in history[0].name  # the first run of the branched workdir started at the source's step
    assert sorted(str(p.relative_to(root / "source")) for p in (root / "source").rglob("*")) == \
        warm_started["source_listing"]


@pytest.mark.slow
def test_warm_start_refusals_name_the_problem(warm_started, tmp_path):
    """Each bad init_from is refused before the new workdir gets a checkpoint, naming what to fix."""
    from ediff_jax.checkpoints import kept_steps
    from ediff_jax.config_utils import validate_config
    from ediff_jax.resume_policy import ResumeChangeError

    root, branched = warm_started["root"], warm_started["branched"]

    def refused(error, match, **changes):
        config = branched.copy_and_resolve_references()
        for key, value in changes.items():
            section, name = key.split("__")
            config[section][name] = value
        target = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        with pytest.raises(error, match=match):
            training.train_and_evaluate(config, target)
        assert kept_steps(target) == []

    refused(ValueError, "must look like WORKDIR or WORKDIR@STEP", experts__init_from=f"{root / 'source'}@two")
    refused(FileNotFoundError, "holds no checkpoint", experts__init_from=str(tmp_path / "nowhere"))
    refused(FileNotFoundError, r"no checkpoint of step 3; its kept steps are \[2\]",
            experts__init_from=f"{root / 'source'}@3")
    refused(ValueError, "holds an expert ensemble", experts__init_from=f"{root / 'branched'}@4",
            train__num_steps=6, experts__phase_steps=(4, 2))
    refused(ValueError, "past the shared phase, which ends at step 1", experts__phase_steps=(1, 3))
    refused(ResumeChangeError, r"(?s)init_from=.*edm\.p_mean", edm__p_mean=0.3)
    refused(CheckpointMismatchError, "model.channels", model__channels=24)
    config = branched.copy_and_resolve_references()
    config.experts.phases = (((0.0, 0.5), (0.5, 1.0)),)
    config.experts.phase_steps = (4,)
    with pytest.raises(ValueError, match=r"must begin with the shared phase \[\(0.0, 1.0\)\]"):
        validate_config(config)


def test_reference_config_expert_variants():
    """configs/shapes_benchmark.py:experts=E,branch_from=W@S gives the shared phase S steps and branches after
    it; a boundary_snr lands at sigma_data / sqrt(SNR); the combinations that mean nothing are refused."""
    from ediff_jax.config_utils import validate_config

    path = REPO / "configs/shapes_benchmark.py"
    c = load_config(f"{path}:experts=2,branch_from=/runs/shared@4000,steps=9897,minutes=0,boundary_snr=0.04")
    validate_config(c)
    assert c.experts.phase_steps == (4000, 5897) and c.experts.init_from == "/runs/shared@4000"
    assert c.train.posthoc_ema.gammas == (16.97, 6.94)  # snapshots are kept across the branch (--ema_sigma_rel)
    np.testing.assert_allclose(experts.boundaries_from_intervals(c.experts.phases[1], c.edm.p_mean, c.edm.p_std),
                               [0.5 / 0.04 ** 0.5], rtol=1e-5)
    for arg, message in (("branch_from=/runs/shared@4000", "give experts=2 or 3"),
                         ("experts=2,branch_from=/runs/shared", "WORKDIR@STEP"),
                         ("experts=3,boundary_sigma=5", "places the one boundary of experts=2")):
        with pytest.raises(ValueError, match=message):
            load_config(f"{path}:{arg}")
