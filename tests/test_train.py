"""Train loop tests on tiny data: one step's math, learning, resume, CLI and bad input."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax import edm, training
from ediff_jax.checkpoints import CheckpointMismatchError
from ediff_jax.config_utils import load_config, validate_config
from ediff_jax.generation import sample_from_workdir


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_config(shapes_data_dir):
    c = load_config(str(REPO / "configs/base64.py:size=tiny"))
    c.data.data_dir = shapes_data_dir
    c.train.num_steps = 4
    c.train.ckpt_every = 2
    c.train.lr = 2e-3
    c.train.warmup_steps = 1
    c.mesh.data = -1
    return c


@pytest.fixture(scope="module")
def exp(tiny_config):
    return training.build_experiment(tiny_config)


@pytest.fixture(scope="module")
def fixed_batch(exp, shapes_data_dir):
    from ediff_jax.data import pipeline

    builder = pipeline.get_dataset_builder("ediff_shapes/32", shapes_data_dir)
    batch = next(pipeline.make_train_iterator(builder, batch_size=8, seed=0, shuffle_buffer=64))
    return {"image": batch["image"], **exp.encoders.tokenize(list(batch["caption"]))}


def test_one_step_is_adamw_on_edm_loss_with_ema(exp, fixed_batch):
    """The step's loss equals the EDM loss recomputed by hand, and EMA = d*old + (1-d)*new."""
    state, shardings = training.init_train_state(exp)
    params0 = jax.tree.map(np.array, state.params)  # a real copy: the step donates (overwrites) state
    step = training.compile_train_step(exp, shardings)
    new_state, metrics = step(state, exp.encoders.params, fixed_batch)

    # Recompute the loss from the same rng streams the step uses.
    rng = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), 0)
    r_sigma, r_noise, r_drop, _ = jax.random.split(rng, 4)
    from ediff_jax.text.conditioning import dropout_conditioning

    cond = dropout_conditioning(r_drop, exp.encoders.encode(exp.encoders.params, fixed_batch),
                                exp.config.text.drop_rates.to_dict())
    sigma = edm.sample_training_sigmas(r_sigma, (8,), exp.config.edm.p_mean, exp.config.edm.p_std)
    noise = jax.random.normal(r_noise, (8, 32, 32, 3))
    net = lambda xs, cn: exp.model.apply({"params": params0}, xs, cn, cond)
    loss = jax.jit(lambda x, s, n: jnp.mean(edm.edm_loss(edm.denoiser_from_network(net), x, s, n)))
    expected = loss(fixed_batch["image"], sigma, noise)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-4)

    assert int(new_state.step) == 1
    d = float(training.ema_decay_at(jnp.int32(0), exp.config.train.ema_decay))
    jax.tree.map(lambda e, p0, p1: np.testing.assert_allclose(e, d * p0 + (1 - d) * p1, rtol=1e-5, atol=1e-7),
                 new_state.ema_params, params0, new_state.params)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), params0, new_state.params))
    # Warmup starts above zero, so step 1 already learns. conv_out is zero-initialised, so at
    # step 1 it is the only layer with a non-zero gradient.
    assert any(changed)
    assert np.any(np.asarray(new_state.params["conv_out"]["kernel"]) != params0["conv_out"]["kernel"])


def test_training_reduces_loss_on_a_fixed_batch(exp, fixed_batch):
    """40 steps on one batch must lower the loss measured with fixed sigmas and noise."""
    state, shardings = training.init_train_state(exp)
    step = training.compile_train_step(exp, shardings)
    sigma = jnp.exp(jnp.linspace(-2.0, 1.0, 8))
    noise = jax.random.normal(jax.random.key(9), (8, 32, 32, 3))
    cond = exp.encoders.encode(exp.encoders.params, fixed_batch)

    @jax.jit
    def eval_loss(params):
        net = lambda xs, cn: exp.model.apply({"params": params}, xs, cn, cond)
        return jnp.mean(edm.edm_loss(edm.denoiser_from_network(net), fixed_batch["image"], sigma, noise))

    before = float(eval_loss(state.params))
    for _ in range(40):
        state, _ = step(state, exp.encoders.params, fixed_batch)
    after = float(eval_loss(state.params))
    assert after < 0.8 * before, (before, after)


@pytest.fixture(scope="module")
def trained_workdir(tiny_config, tmp_path_factory):
    """One 4-step run shared by the tests below; they copy it before changing anything."""
    workdir = tmp_path_factory.mktemp("trained") / "wd"
    state = training.train_and_evaluate(tiny_config, workdir)
    assert int(state.step) == 4
    return workdir


def test_run_writes_checkpoints_metrics_and_grid(trained_workdir, tmp_path):
    from ediff_jax.checkpoints import kept_steps

    assert (trained_workdir / "samples" / "final.png").exists() and (trained_workdir / "config.json").exists()
    assert (trained_workdir / "metrics.jsonl").read_text().count("loss") >= 2
    assert sorted(int(p.name) for p in (trained_workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert kept_steps(trained_workdir) == [2, 4]
    assert kept_steps(tmp_path) == [] and not (tmp_path / "checkpoints").exists()  # reading creates nothing


def test_longer_rerun_resumes(tiny_config, trained_workdir, tmp_path):
    """A time-boxed rerun stops at the first step past its budget with a checkpoint; the next rerun goes on."""
    workdir = tmp_path / "wd"
    shutil.copytree(trained_workdir, workdir)
    longer = tiny_config.copy_and_resolve_references()
    longer.train.num_steps = 6
    longer.train.max_minutes = 1e-9  # spent before the first step ends
    boxed = training.train_and_evaluate(longer, workdir)
    assert int(boxed.step) == 5
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 5
    longer.train.max_minutes = 0.0
    resumed = training.train_and_evaluate(longer, workdir)
    assert int(resumed.step) == 6
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 6


def test_load_workdir_at_a_kept_step(trained_workdir):
    """`step` restores that checkpoint (learning curves); a step not kept is named with the kept ones."""
    from ediff_jax.workdirs import load_workdir

    _, exp_2, at_2 = load_workdir(trained_workdir, step=2)
    config, exp_latest, latest = load_workdir(trained_workdir)
    _, _, at_4 = load_workdir(trained_workdir, step=4)
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa: E731
    assert same(latest, at_4) and not same(at_2, at_4)
    # the restored step is recorded: a run stopped early (time box) reports the samples it saw, not its ceiling
    from experiments.ablations.common import Model

    assert (exp_2.restored_step, exp_latest.restored_step) == (2, 4)
    assert Model(trained_workdir, config, exp_2, at_2).train_samples == 2 * int(config.train.batch_size)
    with pytest.raises(FileNotFoundError, match=r"step 3 .*\[2, 4\]"):
        load_workdir(trained_workdir, step=3)


def test_negative_time_budget_is_refused(tiny_config, tmp_path):
    bad = tiny_config.copy_and_resolve_references()
    bad.train.max_minutes = -1.0
    with pytest.raises(ValueError, match="max_minutes"):
        training.train_and_evaluate(bad, tmp_path / "wd")
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_lr_decay_is_warmup_stable_then_linear_to_zero():
    """train.lr_decay_fraction: the closed form lr * min(1, (t+1)/warmup) * min(1, (N - t) / (f N)), and the
    optimizer follows it: with no weight decay Adam's direction does not depend on the rate, so fed the same
    gradients, each update of the decayed optimizer is the constant one's scaled by the schedules' ratio."""
    from ediff_jax.training.experiment import make_optimizer
    base = dict(lr=1e-2, warmup_steps=2, num_steps=10, weight_decay=0.0, grad_clip=1e9)
    tx_c, constant = make_optimizer({**base, "lr_decay_fraction": 0.0})
    tx_d, decayed = make_optimizer({**base, "lr_decay_fraction": 0.4})  # the last 4 of 10 steps
    expected = [1e-2 * min(1, (t + 1) / 2) * min(1, max(0, 10 - t) / 4) for t in range(12)]
    np.testing.assert_allclose([float(decayed(t)) for t in range(12)], expected, rtol=1e-6)
    np.testing.assert_allclose([float(constant(t)) for t in range(12)],
                               [1e-2 * min(1, (t + 1) / 2) for t in range(12)], rtol=1e-6)
    assert float(decayed(9)) > 0 and float(decayed(10)) == 0.0  # the last update still moves; none after
    params = {"w": jnp.ones(3)}
    state_c, state_d = tx_c.init(params), tx_d.init(params)
    rng = np.random.default_rng(0)
    for t in range(10):
        grads = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
        up_c, state_c = tx_c.update(grads, state_c, params)
        up_d, state_d = tx_d.update(grads, state_d, params)
        np.testing.assert_allclose(up_d["w"], up_c["w"] * expected[t] / float(constant(t)), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])  # ml_collections types the field: no str
def test_bad_lr_decay_fraction_is_refused(tiny_config, bad):
    c = tiny_config.copy_and_resolve_references()
    with c.unlocked():
        c.train.lr_decay_fraction = bad
    with pytest.raises(ValueError, match=r"lr_decay_fraction=.*\[0, 1\]"):
        validate_config(c)


def test_sample_from_workdir(trained_workdir, tmp_path):
    images = sample_from_workdir(trained_workdir, ["a red circle", "a blue square"], num=2, steps=3, progress=False,
                                 out=tmp_path / "out")
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert (tmp_path / "out" / "grid.png").exists() and (tmp_path / "out" / "01_01.png").exists()


def test_mismatched_checkpoint_is_refused_and_left_untouched(tiny_config, trained_workdir, tmp_path):
    workdir = tmp_path / "wd"
    shutil.copytree(trained_workdir, workdir)
    before = {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*")}
    wider = tiny_config.copy_and_resolve_references()
    wider.model.channels = 24
    wider.train.num_steps = 6
    with pytest.raises(CheckpointMismatchError, match=r"model\.channels: checkpoint has 16, config has 24"):
        training.train_and_evaluate(wider, workdir)
    after = {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*")}
    assert before == after


def test_unknown_config_keys_are_named(tiny_config):
    bad = tiny_config.copy_and_resolve_references()
    bad.train.lr_warmup = 10
    bad.modle = {}
    with pytest.raises(ValueError, match=r"train\.lr_warmup") as info:
        validate_config(bad)
    assert "modle (did you mean 'model'?)" in str(info.value)


@pytest.mark.parametrize("sampler, steps, message", [("dpm", 24, "Unknown sampler 'dpm'"),
                                                      ("dpmpp_2m", 2, "needs at least 3 steps")])
def test_a_bad_sampling_config_is_refused_before_training(tiny_config, tmp_path, sampler, steps, message):
    """The grids after (and during) training sample with config.sample: was found after the whole run."""
    bad = tiny_config.copy_and_resolve_references()
    bad.sample.sampler, bad.sample.steps = sampler, steps
    with pytest.raises(ValueError, match=f"config.sample: .*{message}"):
        training.train_and_evaluate(bad, tmp_path / "wd")
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_unknown_dataset_is_named(tiny_config, tmp_path):
    bad = tiny_config.copy_and_resolve_references()
    bad.data.name = "ediff_shapez/32"
    with pytest.raises(ValueError, match="ediff_shapez"):
        training.train_and_evaluate(bad, tmp_path / "wd")


def test_unwritable_workdir_and_output(tiny_config, trained_workdir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot be written"):
        training.train_and_evaluate(tiny_config, blocker / "wd")
    with pytest.raises(ValueError, match="cannot be written"):
        sample_from_workdir(trained_workdir, ["a red circle"], out=blocker / "out")


def test_long_prompt_is_truncated_with_warning(exp, caplog):
    prompt = " ".join(["a red circle to the left of a blue square"] * 10)
    tokens = exp.encoders.tokenize([prompt])
    assert tokens["t5_ids"].shape == (1, exp.config.text.t5_max_length)
    assert "truncated" in caplog.text
    caplog.clear()  # the same caption again (the next epoch of a training loop): no second warning
    exp.encoders.tokenize([prompt, "a red circle"])
    assert "truncated" not in caplog.text


def test_cli_reports_bad_config_key_without_traceback(tmp_path):
    """`--config.key=value` for a key that does not exist fails with a one-line message."""
    result = subprocess.run(
        [sys.executable, "-m", "ediff_jax.train", "--config", "configs/base64.py:size=tiny",
         f"--workdir={tmp_path}", "--config.train.lrr=0.1"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
    )
    assert result.returncode != 0
    assert "lrr" in result.stderr and "Traceback" not in result.stderr


def test_cached_embeddings_give_the_same_step(exp, fixed_batch):
    """The text-cache path (embeddings in the batch) equals running the encoders in the step."""
    state, shardings = training.init_train_state(exp)
    step = training.compile_train_step(exp, shardings)  # the program test_one_step compiled: a cache hit
    cond = jax.device_get(exp.encoders.encode(exp.encoders.params, fixed_batch))
    state2 = jax.tree.map(jnp.copy, state)  # the step donates its input state
    with_tokens, m1 = step(state, exp.encoders.params, fixed_batch)
    with_cache, m2 = step(state2, exp.encoders.params, {"image": fixed_batch["image"], **cond})
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 with_tokens.params, with_cache.params)


def test_sample_with_paint_from_workdir(trained_workdir, tmp_path):
    """Paint-with-words through the workdir path: images, grid and the painted masks are written."""
    from ediff_jax.spec import PaintSpec

    left = np.zeros((50, 70), np.float32)
    left[:, :35] = 1.0
    images = sample_from_workdir(trained_workdir, ["a red circle and a blue square"], num=2, steps=2, progress=False,
                                 out=tmp_path / "out", paint=PaintSpec({"red circle": left}, weight=0.4))
    assert images.shape == (2, 32, 32, 3)
    for name in ("grid.png", "masks.png", "paint.txt", "prompts.txt"):
        assert (tmp_path / "out" / name).exists(), name


def test_painted_panorama_with_a_region_from_workdir(trained_workdir, tmp_path):
    """Paint-with-words on a MultiDiffusion canvas with a region prompt (issue #17: they used to be
    refused together): canvases, grid and the canvas-sized masks are written."""
    from ediff_jax.generation import generate
    from ediff_jax.images import save_png
    from ediff_jax.spec import CanvasSpec, GenerationSpec, PaintSpec, StageSettings

    right = np.zeros((32, 64), np.float32)
    right[:, 32:] = 1.0
    save_png(np.repeat((right * 255).astype(np.uint8)[..., None], 3, -1), tmp_path / "right.png")
    spec = GenerationSpec(workdir=trained_workdir, prompts=("a red circle",), num=1, base=StageSettings(steps=2),
                          canvas=CanvasSpec(width=64, regions=(("a blue square", str(tmp_path / "right.png")),)),
                          paint=PaintSpec({"red circle": 1.0 - right, "blue square": right}, weight=1.0))
    [images] = generate(spec, out=tmp_path / "out", progress=False)
    assert images.shape == (1, 32, 64, 3)
    for name in ("grid.png", "masks.png", "paint.txt", "prompts.txt"):
        assert (tmp_path / "out" / name).exists(), name


def test_python_sampling_refuses_zero_steps_and_a_missing_workdir(trained_workdir, tmp_path):
    """steps=0 used to fall back to the config's steps silently; a missing workdir used to be
    given an empty samples/ folder before the error."""
    with pytest.raises(ValueError, match="base.steps=0: sampler steps are an integer >= 1"):
        sample_from_workdir(trained_workdir, ["a red circle"], steps=0, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        sample_from_workdir(tmp_path / "typo", ["a red circle"])
    assert not (tmp_path / "typo").exists()
