"""Tests for ediff_jax.edm: each test names the property it pins down.

Samplers are checked against problems with known answers (Gaussian data, where the
probability-flow ODE has a closed form, and a finite training set, where the ideal
denoiser is a softmax average) rather than against a copy of the implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax import edm

SD = 0.5  # sigma_data


# --------------------------------------------------------------------------------------
# Preconditioning / training
# --------------------------------------------------------------------------------------


def test_precondition_closed_form_values():
    """Coefficients match Table 1 of EDM at hand-computed sigmas."""
    sigma = np.array([0.002, 0.5, 1.0, 80.0])
    c_skip, c_out, c_in, c_noise = edm.precondition(jnp.asarray(sigma, jnp.float32), SD)
    tot = sigma**2 + SD**2
    np.testing.assert_allclose(c_skip, SD**2 / tot, rtol=1e-6)
    np.testing.assert_allclose(c_out, sigma * SD / np.sqrt(tot), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(tot), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)
    # sigma = sigma_data: c_skip = 1/2, c_out = c_in * sd^2 = sd/sqrt(2).
    c_skip, c_out, c_in, _ = edm.precondition(0.5, 0.5)
    np.testing.assert_allclose([c_skip, c_out, c_in], [0.5, 0.5 / math.sqrt(2), 1 / math.sqrt(0.5)], rtol=1e-6)


def test_precondition_unit_variance_and_gaussian_identity():
    """For data of std sd: c_in makes the input unit-variance, the training target
    F* = (x0 - c_skip x)/c_out has unit variance, and F = 0 already gives the ideal
    Gaussian denoiser x*sd^2/(sd^2+sigma^2); F* recovers x0 exactly. A wrong c_skip,
    c_out or c_in breaks at least one of these."""
    sigma = jnp.geomspace(0.002, 80.0, 17)
    c_skip, c_out, c_in, _ = edm.precondition(sigma, SD)
    np.testing.assert_allclose(c_in**2 * (SD**2 + sigma**2), 1.0, rtol=1e-5)
    var_target = ((1 - c_skip) ** 2 * SD**2 + c_skip**2 * sigma**2) / c_out**2
    np.testing.assert_allclose(var_target, 1.0, rtol=1e-4)
    np.testing.assert_allclose(edm.loss_weight(sigma, SD), 1 / c_out**2, rtol=1e-5)

    k0, k1 = jax.random.split(jax.random.key(0))
    x0 = SD * jax.random.normal(k0, (6, 4, 4, 3))
    sig_b = jnp.array([0.01, 0.1, 0.5, 1.0, 10.0, 80.0])
    x = x0 + sig_b[:, None, None, None] * jax.random.normal(k1, x0.shape)
    zero_net = edm.denoiser_from_network(lambda xs, cn: jnp.zeros_like(xs), SD)
    np.testing.assert_allclose(
        zero_net(x, sig_b), x * SD**2 / (SD**2 + sig_b[:, None, None, None] ** 2), rtol=1e-5
    )
    cs, co, ci, _ = edm.precondition(sig_b[:, None, None, None], SD)
    f_star = (x0 - cs * x) / co
    oracle = edm.denoiser_from_network(lambda xs, cn: f_star, SD)
    np.testing.assert_allclose(oracle(x, sig_b), x0, atol=2e-5)


def test_denoiser_from_network_inputs_and_broadcasting():
    """The network sees c_in*x and c_noise of shape [B] (scalar or per-example sigma),
    extra args/kwargs are passed through, and scalar sigma == the same sigma per example."""
    seen = {}

    def net(xs, c_noise, label, *, scale):
        seen["xs"], seen["c_noise"], seen["label"] = xs, c_noise, label
        return scale * xs

    d = edm.denoiser_from_network(net, SD)
    x = jnp.arange(24.0).reshape(2, 3, 4)
    out_scalar = d(x, 2.0, "lbl", scale=0.3)
    assert seen["c_noise"].shape == (2,) and seen["label"] == "lbl"
    np.testing.assert_allclose(seen["c_noise"], np.log(2.0) / 4, rtol=1e-6)
    np.testing.assert_allclose(seen["xs"], x / np.sqrt(4.0 + SD**2), rtol=1e-6)
    out_vec = d(x, jnp.array([2.0, 2.0]), "lbl", scale=0.3)
    np.testing.assert_allclose(out_scalar, out_vec, rtol=1e-6)
    out_mixed = d(x, jnp.array([2.0, 0.1]), "lbl", scale=0.3)
    np.testing.assert_allclose(out_mixed[0], out_scalar[0], rtol=1e-6)
    assert not np.allclose(out_mixed[1], out_scalar[1])
    with pytest.raises(ValueError):
        d(x, jnp.ones((2, 3)), "lbl", scale=0.3)


def test_edm_loss_is_unweighted_mse_on_network_output():
    """lambda(sigma)*|D - x0|^2 equals |F - F*|^2 per example (the reason for the weight),
    and an oracle network gives zero loss."""
    k0, k1, k2 = jax.random.split(jax.random.key(1), 3)
    x0 = jax.random.normal(k0, (5, 8, 8, 2))
    noise = jax.random.normal(k1, x0.shape)
    sigma = edm.sample_training_sigmas(k2, (5,))
    net = lambda xs, cn: jnp.tanh(xs) * (1 + cn[:, None, None, None])
    loss = edm.edm_loss(edm.denoiser_from_network(net, SD), x0, sigma, noise, SD)
    assert loss.shape == (5,)
    sb = sigma[:, None, None, None]
    x = x0 + sb * noise
    cs, co, ci, cn = edm.precondition(sb, SD)
    f = net(ci * x, cn.reshape(-1))
    expected = jnp.mean((f - (x0 - cs * x) / co) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    oracle = lambda xn, s: x0
    np.testing.assert_allclose(edm.edm_loss(oracle, x0, sigma, noise, SD), 0.0, atol=1e-6)


def test_sample_training_sigmas_lognormal():
    """log(sigma) has mean p_mean and std p_std."""
    s = edm.sample_training_sigmas(jax.random.key(2), (200_000,), p_mean=-0.7, p_std=1.6)
    assert s.shape == (200_000,) and bool(jnp.all(s > 0))
    logs = np.log(np.asarray(s, np.float64))
    assert abs(logs.mean() - (-0.7)) < 0.02
    assert abs(logs.std() - 1.6) < 0.02
    d = edm.sample_training_sigmas(jax.random.key(3), 100_000)
    logd = np.log(np.asarray(d, np.float64))
    assert abs(logd.mean() + 1.2) < 0.03 and abs(logd.std() - 1.2) < 0.03


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 18, 64])
def test_karras_sigmas(n):
    """num_steps+1 float32 values, sigma_max first, sigma_min second to last, exact 0
    last, strictly descending, and equal to EDM eq. (5) evaluated in float64."""
    s = edm.karras_sigmas(n, 0.002, 80.0, 7.0)
    assert s.shape == (n + 1,) and s.dtype == jnp.float32
    s = np.asarray(s)
    assert s[0] == np.float32(80.0)
    assert s[-1] == 0.0
    assert np.all(np.diff(s) < 0)
    i = np.arange(n)
    ramp = i / (n - 1) if n > 1 else np.zeros(1)
    ref = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[:-1], ref, rtol=2e-6)
    if n > 1:
        np.testing.assert_allclose(s[-2], 0.002, rtol=1e-6)


def test_karras_sigmas_rejects_bad_args():
    with pytest.raises(ValueError):
        edm.karras_sigmas(0)
    with pytest.raises(ValueError):
        edm.karras_sigmas(10, sigma_min=1.0, sigma_max=0.5)


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------

S = 0.5  # std of the Gaussian toy data


def gaussian_denoiser(x, sigma):
    """Ideal denoiser for data N(0, S^2): E[x0 | x] = x * S^2 / (S^2 + sigma^2)."""
    return x * S**2 / (S**2 + sigma**2)


def _gaussian_rel_error(sampler, n):
    """Relative error of `sampler` on the Gaussian probability-flow ODE.

    Exact flow: x(sigma) = x(sigma_max) * sqrt(S^2+sigma^2)/sqrt(S^2+sigma_max^2). The
    final step to sigma = 0 is (in Algorithm 2) an Euler step, which for this problem is
    exactly x -> D(x; sigma_min) — linear, so comparing to D(x_exact(sigma_min)) isolates
    the integration error on [sigma_min, sigma_max], the part whose order we test.
    """
    smin, smax = 0.002, 80.0
    x_init = smax * jax.random.normal(jax.random.key(4), (16, 3))
    out = sampler(gaussian_denoiser, x_init, edm.karras_sigmas(n, smin, smax))
    x_smin = x_init * math.sqrt(S**2 + smin**2) / math.sqrt(S**2 + smax**2)
    ref = gaussian_denoiser(x_smin, smin)
    return float(jnp.max(jnp.abs(out - ref) / jnp.abs(ref)))


def test_heun_is_second_order_on_gaussian_ode():
    """Heun's error falls ~4x per doubling of steps (8 -> 16 -> 32); errors here are
    ~1e-2..4e-1, far above float32 round-off, so float32 suffices."""
    e8, e16, e32 = (_gaussian_rel_error(edm.heun_sample, n) for n in (8, 16, 32))
    assert e32 < 0.03
    assert e8 / e16 > 3.0 and e16 / e32 > 3.0, (e8, e16, e32)


def test_euler_is_first_order_on_gaussian_ode():
    """Euler's error falls ~2x per doubling — clearly less than Heun's 4x."""
    e8, e16, e32 = (_gaussian_rel_error(edm.euler_sample, n) for n in (8, 16, 32))
    for r in (e8 / e16, e16 / e32):
        assert 1.6 < r < 2.5, (e8, e16, e32)


def test_dpmpp_2m_is_second_order_on_gaussian_ode():
    """DPM-Solver++(2M): one evaluation per step like Euler, but its error falls ~4x per
    doubling of steps once past 8 steps (where the first-order first step still dominates),
    and at equal evaluations it beats Euler and Heun."""
    e16, e32, e64 = (_gaussian_rel_error(edm.dpmpp_2m_sample, n) for n in (16, 32, 64))
    assert e16 / e32 > 3.0 and e32 / e64 > 3.0, (e16, e32, e64)
    assert e32 < _gaussian_rel_error(edm.euler_sample, 32) / 4  # 32 evaluations each
    assert e32 < _gaussian_rel_error(edm.heun_sample, 16)  # 32 vs 31 evaluations


def test_dpmpp_2m_matches_a_reference_loop_and_needs_two_steps():
    """Against a plain-numpy transcription of k-diffusion's sample_dpmpp_2m, on a nonlinear
    denoiser (so the multistep extrapolation matters); two steps (never second order) are refused."""
    def denoise(x, sigma):
        return np.tanh(x) * 0.7 / (1.0 + sigma)

    sigmas = np.asarray(edm.karras_sigmas(6, 0.01, 20.0), np.float64)
    x0 = 20.0 * np.asarray(jax.random.normal(jax.random.key(1), (4, 3)), np.float64)
    x, old = x0.copy(), None
    for i in range(len(sigmas) - 1):
        d = denoise(x, sigmas[i])
        t, t_next = -np.log(sigmas[i]), (-np.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else np.inf)
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * d
        else:
            r = (t - (-np.log(sigmas[i - 1]))) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
    out = edm.dpmpp_2m_sample(lambda x, s: jnp.tanh(x) * 0.7 / (1.0 + s), jnp.asarray(x0, jnp.float32),
                              jnp.asarray(sigmas, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), x, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="at least 3 steps to be second order"):
        edm.dpmpp_2m_sample(denoise, jnp.ones((1, 3)), edm.karras_sigmas(2))


def test_heun_on_finite_training_set_lands_on_training_points():
    """With the ideal denoiser of a finite data set (softmax over training points) the
    deterministic sampler must reproduce training points: the ODE's sink at sigma -> 0."""
    ys = jnp.array(
        [[1.0, 0.0, 0.0, 0.5], [-1.0, 0.5, 0.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.3, 0.3, -1.0, -1.0], [0.0, 0.0, 0.0, 1.0]]
    )

    def ideal(x, sigma):
        logits = -jnp.sum((x[:, None, :] - ys[None]) ** 2, axis=-1) / (2 * sigma**2)
        return jax.nn.softmax(logits, axis=-1) @ ys

    x_init = 80.0 * jax.random.normal(jax.random.key(5), (256, 4))
    out = edm.heun_sample(ideal, x_init, edm.karras_sigmas(64))
    dist = jnp.min(jnp.linalg.norm(out[:, None] - ys[None], axis=-1), axis=1)
    assert float(jnp.max(dist)) < 1e-4
    # Many inits should reach more than one mode (not a collapse onto a single point).
    hit = jnp.argmin(jnp.linalg.norm(out[:, None] - ys[None], axis=-1), axis=1)
    assert len(np.unique(np.asarray(hit))) == len(ys)


def test_churn_determinism_and_rng_requirement():
    """s_churn > 0 with a fixed rng is reproducible, different rngs / s_churn=0 differ,
    and s_churn > 0 without rng is a ValueError (for both samplers)."""
    sig = edm.karras_sigmas(10)
    x_init = 80.0 * jax.random.normal(jax.random.key(6), (4, 3))
    kw = dict(s_churn=20.0, s_tmin=0.05, s_tmax=50.0)
    a = edm.heun_sample(gaussian_denoiser, x_init, sig, rng=jax.random.key(7), **kw)
    b = edm.heun_sample(gaussian_denoiser, x_init, sig, rng=jax.random.key(7), **kw)
    c = edm.heun_sample(gaussian_denoiser, x_init, sig, rng=jax.random.key(8), **kw)
    det = edm.heun_sample(gaussian_denoiser, x_init, sig)
    assert bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(c)))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, det)
    # rng is ignored without churn: same as the deterministic run.
    np.testing.assert_array_equal(det, edm.heun_sample(gaussian_denoiser, x_init, sig, rng=jax.random.key(7)))
    for sampler in (edm.heun_sample, edm.euler_sample):
        with pytest.raises(ValueError, match="rng"):
            sampler(gaussian_denoiser, x_init, sig, s_churn=1.0)


@pytest.mark.parametrize("sampler", [edm.heun_sample, edm.euler_sample])
@pytest.mark.parametrize("s_churn", [2.0, 40.0])
def test_churn_noise_variance(sampler, s_churn):
    """With D(x) = x the ODE drift vanishes, so the output is x_init plus only the churn
    noise, whose variance must be s_noise^2 * sum_i (sigma_hat_i^2 - sigma_i^2) over
    sigma_i in [s_tmin, s_tmax], with gamma = min(s_churn/N, sqrt(2)-1). Pins the noise
    scale, the gamma cap, the window and s_noise."""
    n, s_tmin, s_tmax, s_noise = 8, 0.05, 10.0, 0.8
    sig = edm.karras_sigmas(n)
    x_init = jnp.zeros((40_000,))
    out = sampler(lambda x, s: x, x_init, sig, rng=jax.random.key(11), s_churn=s_churn,
                  s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    s_np = np.asarray(sig[:-1], np.float64)
    in_window = (s_np >= s_tmin) & (s_np <= s_tmax)
    assert 0 < in_window.sum() < n  # the window really excludes some steps
    expected = s_noise**2 * np.sum(s_np[in_window] ** 2 * ((1 + gamma) ** 2 - 1))
    np.testing.assert_allclose(float(jnp.var(out)), expected, rtol=0.03)


def test_churn_outside_tmin_tmax_is_a_no_op():
    """Noise is only added for sigma in [s_tmin, s_tmax]: a window above sigma_max
    leaves the run identical to the deterministic one."""
    sig = edm.karras_sigmas(6)
    x_init = 80.0 * jax.random.normal(jax.random.key(9), (4, 3))
    det = edm.euler_sample(gaussian_denoiser, x_init, sig)
    churned = edm.euler_sample(
        gaussian_denoiser, x_init, sig, rng=jax.random.key(0), s_churn=40.0, s_tmin=100.0, s_tmax=200.0
    )
    np.testing.assert_allclose(churned, det, rtol=1e-6)


def test_sigmas_validation():
    """Malformed schedules are rejected at the boundary with a clear message."""
    x = jnp.ones((2, 3))
    for bad, msg in [
        (jnp.array([1.0]), "at least 2"),
        (jnp.ones((2, 2)), "1-D"),
        (jnp.array([1.0, 2.0, 0.0]), "descending"),
        (jnp.array([2.0, 1.0]), "end with exactly 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            edm.heun_sample(gaussian_denoiser, x, bad)


def test_heun_under_jit_compiles_once_for_traced_sigmas():
    """sigmas can be a traced argument: two schedules of equal length reuse one trace
    (and give the right, different answers), the whole run being one program."""
    traces = []

    @jax.jit
    def run(x, sigmas):
        traces.append(1)
        return edm.heun_sample(gaussian_denoiser, x, sigmas)

    x_init = 80.0 * jax.random.normal(jax.random.key(10), (8, 2))
    s1 = edm.karras_sigmas(12)
    s2 = edm.karras_sigmas(12, sigma_min=0.01, rho=3.0)
    o1, o2 = run(x_init, s1), run(x_init, s2)
    assert len(traces) == 1
    np.testing.assert_allclose(o1, edm.heun_sample(gaussian_denoiser, x_init, s1), rtol=1e-5)
    np.testing.assert_allclose(o2, edm.heun_sample(gaussian_denoiser, x_init, s2), rtol=1e-5)
    assert not np.allclose(o1, o2)
    # The step loop is a single loop primitive in the program, not N unrolled steps.
    jaxpr = jax.make_jaxpr(lambda x, s: edm.heun_sample(gaussian_denoiser, x, s))(x_init, s1)
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert sum(p in ("while", "scan") for p in prims) == 1, prims


def test_denoiser_calls_per_run():
    """Heun spends 2N-1 evaluations (no correction on the step to 0), Euler N —
    counted at run time with a host callback inside the compiled loop."""
    calls = []

    def counting(x, sigma):
        jax.debug.callback(lambda s: calls.append(float(s)), sigma)
        return gaussian_denoiser(x, sigma)

    x_init = jnp.ones((2, 2))
    edm.heun_sample(counting, x_init, edm.karras_sigmas(5)).block_until_ready()
    jax.effects_barrier()
    assert len(calls) == 2 * 5 - 1 and 0.0 not in calls
    calls.clear()
    edm.euler_sample(counting, x_init, edm.karras_sigmas(5)).block_until_ready()
    jax.effects_barrier()
    assert len(calls) == 5


def test_progress_bar_completes_each_run(capsys):
    """progress=True draws a tqdm bar from inside the loop; a jitted sampler called twice
    draws two complete bars (the host-side state resets between runs)."""
    f = jax.jit(lambda x, s: edm.heun_sample(gaussian_denoiser, x, s, progress=True))
    x_init = jnp.ones((2, 2))
    for _ in range(2):
        f(x_init, edm.karras_sigmas(7)).block_until_ready()
        jax.effects_barrier()
    err = capsys.readouterr().err
    assert err.count("7/7") >= 2, err
    edm.heun_sample(gaussian_denoiser, x_init, edm.karras_sigmas(7)).block_until_ready()
    jax.effects_barrier()
    assert "/7" not in capsys.readouterr().err  # quiet by default


# --------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------


def _toy_model(calls):
    """D(x, sigma, cond) = x/(1+sigma) + cond['emb'] * cond['gain'][:, None]."""

    def model_fn(x, sigma, cond):
        calls.append(x.shape[0])
        return x / (1 + sigma) + cond["emb"] * cond["gain"][:, None]

    return model_fn


def test_guided_denoiser_one_batched_call_and_linear_combination():
    """One model call on a 2B batch per evaluation; g=0 -> uncond, g=1 -> cond,
    g=3 -> uncond + 3*(cond - uncond)."""
    B = 3
    x = jnp.arange(12.0).reshape(B, 4)
    cond = {"emb": jnp.ones((B, 4)), "gain": jnp.array([1.0, 2.0, 3.0])}
    uncond = {"emb": jnp.zeros((1, 4)) + 0.25, "gain": jnp.ones((1,))}  # broadcast null
    calls = []
    model = _toy_model(calls)
    d_cond = model(x, 0.7, cond)
    d_unc = model(x, 0.7, jax.tree.map(lambda u: jnp.broadcast_to(u, (B,) + u.shape[1:]), uncond))
    calls.clear()
    for g, expected in [(0.0, d_unc), (1.0, d_cond), (3.0, d_unc + 3.0 * (d_cond - d_unc))]:
        out = edm.guided_denoiser(model, cond, uncond, g)(x, 0.7)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert calls == [2 * B, B, 2 * B]  # g=1 (Python number) skips the unconditional half
    # Traced guidance: still one 2B call, still exact (g=1 here must equal cond).
    calls.clear()
    out = jax.jit(lambda g: edm.guided_denoiser(model, cond, uncond, g)(x, 0.7))(jnp.float32(1.0))
    np.testing.assert_allclose(out, d_cond, rtol=1e-6)
    assert calls == [2 * B]


def test_guided_denoiser_in_sampler_calls_model_once_per_evaluation():
    """Inside heun_sample the guided model is traced once per denoiser evaluation site
    with batch 2B (never two separate B-sized calls)."""
    B = 2
    calls = []
    cond = {"emb": jnp.ones((B, 3)), "gain": jnp.ones((B,))}
    uncond = {"emb": jnp.zeros((B, 3)), "gain": jnp.zeros((B,))}
    dn = edm.guided_denoiser(_toy_model(calls), cond, uncond, 2.0)
    out = edm.heun_sample(dn, 80.0 * jnp.ones((B, 3)), edm.karras_sigmas(4))
    assert calls == [2 * B, 2 * B]  # Heun's first evaluation + the correction (in lax.cond)
    assert out.shape == (B, 3) and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="batch"):
        edm.guided_denoiser(_toy_model([]), cond, uncond, 2.0)(jnp.ones((B + 1, 3)), 1.0)
