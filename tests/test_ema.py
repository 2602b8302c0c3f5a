"""EMA: several decays at once, power-function EMA profiles, and EDM2 post-hoc reconstruction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax import ema


def params_at(step: int) -> dict:
    """A deterministic parameter trajectory with two leaves of different shapes."""
    return {"w": jnp.full((3, 2), jnp.sin(0.3 * step)), "b": jnp.asarray([step * 0.1, -step * 0.05])}


# ----------------------------------------------------------------------------- classic EMA


def test_warmup_decay_matches_trainer():
    """The multi-decay EMA uses exactly the trainer's warm-up decay schedule."""
    from ediff_jax.training import ema_decay_at

    for step in (0, 1, 5, 100, 10_000, 1_000_000):
        for decay in (0.9, 0.999, 0.9999):
            assert float(ema.warmup_decay(step, decay)) == float(ema_decay_at(jnp.asarray(step), decay))


def test_multi_decay_equals_separate_single_decay_emas():
    """Tracking {0.5, 0.99} together gives bit-identical results to two separate single-decay EMAs."""
    decays = {"fast": 0.5, "slow": 0.99}  # 0.5 leaves the warm-up (1+t)/(10+t) at t = 8
    together = ema.init_emas(params_at(0), decays)
    separate = {name: params_at(0) for name in decays}

    def single(e, p, step, decay):  # the trainer's formula, written out
        d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
        return jax.tree.map(lambda a, b: d * a + (1.0 - d) * b, e, p)

    for step in range(30):
        p = params_at(step + 1)
        together = ema.ema_update(together, p, jnp.asarray(step), decays)
        separate = {n: single(separate[n], p, jnp.float32(step), d) for n, d in decays.items()}
    for name in decays:
        for a, b in zip(jax.tree.leaves(together[name]), jax.tree.leaves(separate[name])):
            np.testing.assert_array_equal(a, b)
    assert not np.allclose(together["fast"]["w"], together["slow"]["w"])  # the decays really differ


def test_ema_update_rejects_mismatched_names_and_bad_decays():
    """Names of EMA trees and decays must agree; decays must lie in [0, 1)."""
    with pytest.raises(ValueError, match="must have the same names"):
        ema.ema_update({"a": params_at(0)}, params_at(1), 0, {"b": 0.9})
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        ema.init_emas(params_at(0), {"a": 1.0})


# ----------------------------------------------------------------------------- power EMA


def run_power_ema(values: np.ndarray, gamma: float) -> np.ndarray:
    """EMA after each step of a scalar sequence theta_1..theta_T (trainer step = t - 1)."""
    def body(e, inputs):
        step, theta = inputs
        e = ema.power_ema_update(e, theta, step, gamma)
        return e, e

    _, out = jax.lax.scan(body, jnp.float32(0.0), (jnp.arange(len(values)), jnp.asarray(values, jnp.float32)))
    return np.asarray(out)


@pytest.mark.parametrize("gamma", [0.0, 6.94, 16.97])
def test_power_ema_equals_explicit_weighted_average(gamma):
    """After t steps: sum_tau w_tau theta_tau with w_tau = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1).

    These discrete weights telescope to 1 and approach the continuous profile
    (g+1) tau^g / t^(g+1), i.e. weights ~ tau^gamma; gamma = 0 is the plain running mean.
    """
    rng = np.random.default_rng(0)
    values = rng.standard_normal(400)
    got = run_power_ema(values, gamma)
    tau = np.arange(1, len(values) + 1, dtype=np.float64)
    for t in (1, 2, 17, 400):
        w = (tau[:t] ** (gamma + 1) - (tau[:t] - 1) ** (gamma + 1)) / t ** (gamma + 1)
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(got[t - 1], np.dot(w, values[:t]), rtol=2e-5, atol=2e-6)
    w_cont = tau ** gamma / np.sum(tau ** gamma)  # the continuous profile ~ tau^gamma, sampled
    assert np.abs(w - w_cont).sum() < 2e-3  # (w is the t = 400 profile from the loop)
    if gamma == 0.0:
        np.testing.assert_allclose(got, np.cumsum(values) / tau, rtol=2e-5, atol=2e-6)


def test_first_power_ema_step_copies_params_and_late_steps_stay_accurate():
    """t = 1 gives beta = 0 (EMA = params); at t = 1e6 float32 still gives 1 - beta = (g+1)/t to 1e-4."""
    out = ema.power_ema_update({"x": jnp.float32(5.0)}, {"x": jnp.float32(-2.0)}, 0, 6.94)
    assert float(out["x"]) == -2.0
    beta, one_minus = ema.power_ema_beta(jnp.asarray(999_999), 6.94)
    exact = -np.expm1(7.94 * np.log1p(-1e-6))
    np.testing.assert_allclose(float(one_minus), exact, rtol=1e-4)
    np.testing.assert_allclose(float(beta) + float(one_minus), 1.0, rtol=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 1 / np.sqrt(12), 0.3])
def test_sigma_rel_gamma_round_trip(sigma_rel):
    """sigma_rel -> gamma -> sigma_rel is the identity; EDM2's reference pairs hold."""
    gamma = ema.sigma_rel_to_gamma(sigma_rel)
    assert gamma > -1
    np.testing.assert_allclose(ema.gamma_to_sigma_rel(gamma), sigma_rel, rtol=1e-9)


def test_sigma_rel_reference_values_and_validation():
    """gamma = 0 is a uniform average (sigma_rel = 1/sqrt(12)); EDM2's 0.05/0.10 give gamma ~ 16.97/6.94."""
    np.testing.assert_allclose(ema.gamma_to_sigma_rel(0.0), 1 / np.sqrt(12))
    np.testing.assert_allclose(ema.sigma_rel_to_gamma(np.array([0.05, 0.10])), [16.97, 6.94], atol=0.01)
    with pytest.raises(ValueError, match="must lie in"):
        ema.sigma_rel_to_gamma(0.35)
    with pytest.raises(ValueError, match="must be finite and > -1"):
        ema.gamma_to_sigma_rel(-1.0)


def test_profile_inner_products_match_numerical_integration():
    """The closed-form <p_a, p_b> equals the integral of the two normalised tau^gamma profiles."""
    tau = np.linspace(0, 1000, 2_000_001)
    prof = lambda t, g: np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)
    for (ta, ga), (tb, gb) in [((1000, 6.94), (600, 16.97)), ((300, 2.0), (1000, 6.94)), ((500, 3.0), (500, 3.0))]:
        numeric = np.trapezoid(prof(ta, ga) * prof(tb, gb), tau)
        np.testing.assert_allclose(ema.profile_inner_products(ta, ga, tb, gb), numeric, rtol=1e-4)


# ----------------------------------------------------------------------------- post-hoc EMA


def test_posthoc_reconstruction_matches_directly_tracked_ema():
    """From snapshots of two power EMAs (sigma_rel 0.05, 0.10), an EMA of sigma_rel 0.07 or 0.15 at the
    end of training is reconstructed close to the same EMA tracked directly (random-walk parameters)."""
    steps, every, width = 4000, 250, 512
    rng = np.random.default_rng(0)
    trajectory = np.cumsum(rng.standard_normal((steps, width)), axis=0).astype(np.float32)  # theta_1..theta_T
    tracked = {"a": ema.sigma_rel_to_gamma(0.05), "b": ema.sigma_rel_to_gamma(0.10)}
    targets = {s: ema.sigma_rel_to_gamma(s) for s in (0.07, 0.15)}
    gammas = {**tracked, **{f"t{s}": g for s, g in targets.items()}}

    @jax.jit
    def run(thetas):
        init = {k: jnp.zeros((width,), jnp.float32) for k in gammas}

        def body(emas, inputs):
            step, theta = inputs
            emas = ema.power_ema_updates(emas, theta, step, gammas)
            return emas, emas

        return jax.lax.scan(body, init, (jnp.arange(steps), thetas))[1]

    history = jax.tree.map(np.asarray, run(jnp.asarray(trajectory)))
    snapshots = [ema.PowerEMASnapshot(t, tracked[k], history[k][t - 1])
                 for t in range(every, steps + 1, every) for k in tracked]
    scale = np.linalg.norm(history["a"][-1] - history["b"][-1])  # how far apart the tracked EMAs are
    for sigma_rel in targets:
        recon = ema.posthoc_ema(snapshots, steps, sigma_rel)
        direct = history[f"t{sigma_rel}"][-1]
        err = np.linalg.norm(recon - direct)
        assert err < 0.01 * scale, (sigma_rel, err, scale)  # measured ~0.001-0.002
        # and it is a real reconstruction, not just the nearest tracked EMA
        nearest = min(np.linalg.norm(history[k][-1] - direct) for k in tracked)
        assert err < 0.05 * nearest, (sigma_rel, err, nearest)


def test_posthoc_reconstructs_a_tracked_snapshot_exactly():
    """Asking for a profile that is itself a snapshot returns coefficient 1 on it and 0 elsewhere."""
    g = [ema.sigma_rel_to_gamma(0.05), ema.sigma_rel_to_gamma(0.10)]
    coeffs = ema.solve_posthoc_coefficients([100, 100, 200, 200], g * 2, 200, 0.10)
    np.testing.assert_allclose(coeffs, [0, 0, 0, 1], atol=1e-8)
    snaps = [{"x": jnp.float32(v)} for v in (1.0, 2.0, 3.0, 4.0)]
    assert float(ema.reconstruct_ema(snaps, coeffs)["x"]) == pytest.approx(4.0, abs=1e-5)


def test_posthoc_inputs_are_validated():
    """Targets past the last snapshot, duplicate snapshots, and count mismatches are refused clearly."""
    g = ema.sigma_rel_to_gamma(0.05)
    with pytest.raises(ValueError, match="no information about later parameters"):
        ema.solve_posthoc_coefficients([100, 200], g, 300, 0.1)
    with pytest.raises(ValueError, match="linearly dependent"):
        ema.solve_posthoc_coefficients([100, 100], [g, g], 100, 0.1)
    with pytest.raises(ValueError, match="one coefficient per snapshot"):
        ema.reconstruct_ema([{"x": jnp.zeros(())}], [0.5, 0.5])
    assert ema.snapshot_due(500, 250) and not ema.snapshot_due(499, 250)


# ----------------------------------------------------------------------------- post-hoc EMA, wired in


@pytest.mark.slow
def test_posthoc_ema_of_a_training_run_matches_the_tracked_power_ema(shapes_data_dir, tmp_path):
    """Training saves power-EMA snapshots (sigma_rel 0.05 and 0.20) every 4 steps; sampling's
    `load_workdir(ema_sigma_rel=0.12)` reconstructs from them the EMA that a second run of the
    same (deterministic) training tracked directly with sigma_rel 0.12, far closer than either
    tracked EMA is to it."""
    from helpers import tiny_train_config

    from ediff_jax import training
    from ediff_jax.workdirs import load_workdir

    steps, target = 40, 0.12

    def run(name, sigma_rels, every):
        c = tiny_train_config(shapes_data_dir, num_steps=steps)
        c.train.posthoc_ema.gammas = tuple(float(ema.sigma_rel_to_gamma(s)) for s in sigma_rels)
        c.train.posthoc_ema.every = every
        return training.train_and_evaluate(c, tmp_path / name)

    snapshotted = run("snapshots", (0.05, 0.20), 4)
    tracked = run("tracked", (target,), steps)
    assert sorted(int(p.name) for p in (tmp_path / "snapshots" / "posthoc_ema").iterdir() if p.name.isdigit()) == \
        list(range(4, steps + 1, 4))
    _, exp, recon = load_workdir(tmp_path / "snapshots", ema_sigma_rel=target)
    assert exp.restored_step == steps
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(tree))])
    direct = flat(tracked.power_emas[0])
    np.testing.assert_allclose(flat(tracked.params), flat(snapshotted.params), rtol=1e-5, atol=1e-6)  # same training
    err = np.linalg.norm(flat(recon) - direct)
    nearest = min(np.linalg.norm(flat(e) - direct) for e in snapshotted.power_emas)
    assert err < 0.01 * nearest, (err, nearest)  # measured 0.0024x (2026-12-03)
    with pytest.raises(ValueError, match="needs post-hoc EMA snapshots, and this workdir's run kept none"):
        load_workdir(_no_posthoc_workdir(shapes_data_dir, tmp_path), ema_sigma_rel=target)


def _no_posthoc_workdir(shapes_data_dir, tmp_path):
    """A workdir whose config keeps no power EMAs (only config.json: refused before any checkpoint is read)."""
    from helpers import tiny_train_config

    workdir = tmp_path / "plain"
    workdir.mkdir()
    (workdir / "config.json").write_text(tiny_train_config(shapes_data_dir).to_json_best_effort())
    return workdir


def test_posthoc_ema_of_branched_experts_matches_each_experts_tracked_ema(tmp_path):
    """eDiff-I's branching (1 -> 2 -> 3 experts) with snapshots of each phase saved by the trainer's
    `SnapshotWriter`: `reconstruct` gives every final expert the EMA (sigma_rel 0.15, wide enough that
    the pre-branch snapshots matter) tracked directly along that expert's own trajectory (its
    ancestors' up to each branch), to within 1% of the tracked EMAs' spread; a snapshot of an
    ensemble is refused for a one-model checkpoint."""
    from types import SimpleNamespace

    from jax.sharding import NamedSharding, PartitionSpec

    from ediff_jax import posthoc_snapshots

    steps, every, width, branch_1, branch_2 = 400, 20, 64, 160, 280
    phases = [[(0.0, 1.0)], [(0.0, 0.5), (0.5, 1.0)], [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0)]]
    ancestors = [[0, 0, 0], [0, 0, 1], [0, 1, 2]]  # each final expert's expert in phases 0, 1, 2
    rng = np.random.default_rng(1)
    walks = [rng.standard_normal((steps, n, width)).astype(np.float32) for n in (1, 2, 3)]
    phase_of = lambda t: 0 if t <= branch_1 else 1 if t <= branch_2 else 2  # 1-based step t
    increments = np.stack([np.stack([walks[phase_of(t + 1)][t, ancestors[j][phase_of(t + 1)]] for j in range(3)])
                           for t in range(steps)])
    trajectory = np.cumsum(increments, axis=0)  # [steps, 3 final experts, width]: equal rows until they branch
    tracked = {"a": ema.sigma_rel_to_gamma(0.05), "b": ema.sigma_rel_to_gamma(0.10)}
    gammas = {**tracked, "target": ema.sigma_rel_to_gamma(0.15)}

    @jax.jit
    def run(thetas):
        def body(emas, inputs):
            emas = ema.power_ema_updates(emas, inputs[1], inputs[0], gammas)
            return emas, emas

        return jax.lax.scan(body, {k: jnp.zeros((3, width)) for k in gammas}, (jnp.arange(steps), thetas))[1]

    history = jax.tree.map(np.asarray, run(jnp.asarray(trajectory)))
    writer = posthoc_snapshots.SnapshotWriter(tmp_path, list(tracked.values()), every)
    for t in range(every, steps + 1, every):
        p = phase_of(t)
        held = [ancestors[j][p] for j in range(3)].index  # a final expert descending from each held expert
        state = SimpleNamespace(power_emas=tuple(
            {"w": jnp.asarray(history[k][t - 1][[held(i) for i in range(len(phases[p]))]])} for k in tracked))
        writer.maybe_save(t, state, phases[p])
    writer.close()

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    abstract = {"w": jax.ShapeDtypeStruct((3, width), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))}
    recon, step = posthoc_snapshots.reconstruct(tmp_path, abstract, 0.15, expert_intervals=phases[2])
    assert step == steps and recon["w"].shape == (3, width)
    direct = history["target"][-1]
    scale = np.linalg.norm(history["a"][-1] - history["b"][-1])
    err = np.linalg.norm(np.asarray(recon["w"]) - direct, axis=-1)
    assert np.all(err < 0.01 * scale), (err, scale)
    with pytest.raises(ValueError, match="holds an ensemble, but the checkpoint it is reconstructed for does not"):
        posthoc_snapshots.reconstruct(tmp_path, abstract, 0.15)
