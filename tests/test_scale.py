"""Scale-out training: FSDP equals one device, multi-host equals one process, preemption loses
nothing, corrupt checkpoints fall back, NaN handling, extra EMAs, gradient accumulation."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax import distributed, parallel, training
from helpers import tiny_train_config

REPO = Path(__file__).resolve().parents[1]


tiny = tiny_train_config


def fixed_batch(exp, n: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
            **exp.encoders.tokenize(["a red circle", "a blue square"] * (n // 2))}


def run_steps(exp, batch: dict, steps: int = 2):
    state, shardings = training.init_train_state(exp)
    step = training.compile_train_step(exp, shardings)
    arrays = parallel.shard_batch(batch, exp.mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, exp.encoders.params, arrays)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.slow
def test_fsdp_on_8_devices_equals_one_device(shapes_data_dir):
    """Same seed, same batch: data x FSDP on 8 devices gives one device's losses and parameters,
    and the FSDP-ruled tensors really are split (each device holds a quarter), the text encoders the
    step runs included."""
    one = tiny(shapes_data_dir)
    one.mesh.data = 1
    exp1 = training.build_experiment(one, jax.devices()[:1])
    sharded = tiny(shapes_data_dir)
    sharded.mesh.data, sharded.mesh.fsdp = 2, 4
    sharded.sharding.fsdp_min_size = 64
    exp8 = training.build_experiment(sharded)
    batch = fixed_batch(exp1)
    state1, loss1 = run_steps(exp1, batch)
    state8, loss8 = run_steps(exp8, batch)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), state8.params, state1.params)

    kernel = state8.params["down_0_0"]["conv1"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)
    shard = kernel.addressable_shards[0].data.shape
    assert np.prod(shard) * 4 == np.prod(kernel.shape)
    mu = jax.tree.leaves(state8.opt_state[1][0].mu)  # adam's first moment follows its parameter
    assert any("fsdp" in str(m.sharding.spec) for m in mu)
    assert any("fsdp" in str(w.sharding.spec) for w in jax.tree.leaves(exp8.encoders.params["t5"]))


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from ediff_jax import distributed, parallel, training
    sys.path.insert(0, {tests!r})
    from test_scale import tiny, fixed_batch
    distributed.initialize()
    config = tiny({data_dir!r})
    exp = training.build_experiment(config)
    batch = fixed_batch(exp)
    per = 8 // jax.process_count()
    local = jax.tree.map(lambda x: x[jax.process_index() * per:(jax.process_index() + 1) * per], batch)
    state, shardings = training.init_train_state(exp)
    step = training.compile_train_step(exp, shardings)
    arrays = parallel.shard_batch(local, exp.mesh)
    for _ in range(2):
        state, metrics = step(state, exp.encoders.params, arrays)
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)  # replicated: any local copy
    if jax.process_index() == 0:
        np.savez({out!r}, **{{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}})
""")


@pytest.mark.slow
def test_two_processes_equal_one_process(shapes_data_dir, tmp_path):
    """2 processes x 2 devices on localhost (jax.distributed, gloo), each feeding its half of the
    global batch, end with the parameters of one process on 4 devices."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests"), data_dir=shapes_data_dir, out=str(tmp_path / "two.npz")))
    distributed.launch_local_processes([str(script)], num_processes=2, devices_per_process=2, timeout=300,
                                       cwd=str(REPO))
    exp = training.build_experiment(tiny(shapes_data_dir), jax.devices()[:4])
    state, _ = run_steps(exp, fixed_batch(exp))
    two = np.load(tmp_path / "two.npz")
    for path, value in jax.tree_util.tree_leaves_with_path(state.params):
        np.testing.assert_allclose(two[jax.tree_util.keystr(path)], np.asarray(value), rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def eight_steps(shapes_data_dir, tmp_path_factory):
    """An 8-step config (checkpoint every step, 3 kept), its JSON for subprocess drivers, and
    the parameters of an uninterrupted run: what every interrupted run must end with."""
    config = tiny(shapes_data_dir, num_steps=8, ckpt_every=1, keep_ckpts=3)
    tmp = tmp_path_factory.mktemp("eight_steps")
    config_json = tmp / "config.json"
    config_json.write_text(config.to_json_best_effort())
    straight = training.train_and_evaluate(config, tmp / "straight")
    return config, config_json, jax.tree.map(np.array, (straight.params, straight.ema_params))


def start_training(config_json: Path, workdir: Path) -> subprocess.Popen:
    """`train_and_evaluate` in a subprocess, under this process's XLA flags (tests/conftest.py):
    the interrupted halves and the uninterrupted run must be one compiled program. Different
    flags (e.g. another --xla_backend_optimization_level) reorder float operations, and no
    resume can be exact across that."""
    driver = textwrap.dedent(f"""
        from ediff_jax import training
        from ediff_jax.config_utils import config_from_json
        training.train_and_evaluate(config_from_json(open({str(config_json)!r}).read()), {str(workdir)!r})
    """)
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"]}
    return subprocess.Popen([sys.executable, "-c", driver], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def assert_same_run(state, expected) -> None:
    jax.tree.map(np.testing.assert_array_equal, (state.params, state.ema_params), expected)


@pytest.mark.slow
def test_sigterm_then_resume_is_bitwise_identical(eight_steps, tmp_path):
    """A run stopped by SIGTERM mid-training saves the step in flight; resumed, it ends bitwise
    identical to an uninterrupted run. While it runs, a second trainer on its workdir is refused."""
    from ediff_jax.checkpoints import kept_steps
    from ediff_jax.workdir_lock import WorkdirLockedError

    config, config_json, expected = eight_steps
    workdir = tmp_path / "preempted"
    proc = start_training(config_json, workdir)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            with pytest.raises(WorkdirLockedError, match=f"pid {proc.pid}"):
                training.train_and_evaluate(config, workdir)
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "SIGTERM: saved step" in output
    stopped_at = kept_steps(workdir)[-1]
    assert 2 <= stopped_at < 8, output
    assert_same_run(training.train_and_evaluate(config, workdir), expected)


def orbax_tmp_dirs(checkpoints: Path) -> list[str]:
    """Checkpoints orbax is still writing (finalised by an atomic rename)."""
    try:
        return [e.name for e in os.scandir(checkpoints) if "tmp" in e.name]
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_to_the_same_parameters(eight_steps, tmp_path):
    """kill -9, alternately the moment a checkpoint is being written and after a random delay:
    every relaunch resumes (taking over the dead run's lock at once) from a complete checkpoint,
    nothing is ever set aside as unreadable, and the run ends bitwise where an uninterrupted one
    does."""
    from ediff_jax.checkpoints import kept_steps

    config, config_json, expected = eight_steps
    workdir = tmp_path / "killed"
    checkpoints = workdir / "checkpoints"
    rng = np.random.default_rng(0)
    killed_during_save, outputs = [], []
    for attempt in range(4):
        proc = start_training(config_json, workdir)
        mode = "save" if attempt % 2 == 0 else "random"
        started, delay = time.monotonic(), float(rng.uniform(3.0, 12.0))
        while proc.poll() is None and time.monotonic() - started < 240:
            writing = orbax_tmp_dirs(checkpoints)
            if (mode == "save" and writing) or (mode == "random" and time.monotonic() - started > delay):
                proc.kill()
                killed_during_save.append(bool(writing))
                break
            time.sleep(0.001 if mode == "save" else 0.05)
        outputs.append(proc.communicate(timeout=60)[0])
        if proc.returncode == 0:  # finished before the kill came
            break
        assert proc.returncode == -signal.SIGKILL, outputs[-1]
    assert any(killed_during_save), f"no kill landed during a checkpoint write: {killed_during_save}"
    with warnings.catch_warnings(record=True) as caught:  # at most: the dead run's lock was replaced
        warnings.simplefilter("always")
        final = training.train_and_evaluate(config, workdir)
    assert not [w for w in caught if "could not be read" in str(w.message) or "damaged" in str(w.message)]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith("unreadable_")]
    assert kept_steps(workdir)[-1] == 8
    assert_same_run(final, expected)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_with_warning(shapes_data_dir, tmp_path):
    """An unreadable latest checkpoint is moved aside (kept) and the previous one resumed."""
    config = tiny(shapes_data_dir, num_steps=4, ckpt_every=2)
    training.train_and_evaluate(config, tmp_path, stop_after=4)
    ckpt_dir = tmp_path / "checkpoints"
    for f in (ckpt_dir / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)  # truncated garbage
    from ediff_jax.checkpoints import Checkpointer, abstract_with_shardings

    config.train.num_steps = 4
    with pytest.warns(UserWarning, match="step 4 .* could not be read"):
        step, _, _ = Checkpointer(tmp_path, async_save=False).restore_latest_good(
            lambda meta: abstract_with_shardings(*training.state_shardings(training.build_experiment(config))),
            quarantine=True)
    assert step == 2
    assert (ckpt_dir / "unreadable_4").is_dir()  # nothing the user had is deleted


@pytest.mark.slow
def test_nonfinite_loss_names_the_step_or_is_skipped(shapes_data_dir, tmp_path):
    """A NaN batch stops the run naming its step; with skip_nonfinite the update is skipped."""
    exp = training.build_experiment(tiny(shapes_data_dir))
    batch = fixed_batch(exp)
    history = []
    state, shardings = training.init_train_state(exp)
    step = training.compile_train_step(exp, shardings)
    bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
    for b in (batch, bad):
        state, metrics = step(state, exp.encoders.params, parallel.shard_batch(b, exp.mesh))
        history.append(metrics)
    with pytest.raises(FloatingPointError, match="at step 11"):
        training.summarize(history, 10, skip_nonfinite=False)

    skipping = tiny(shapes_data_dir, skip_nonfinite=True)
    exp = training.build_experiment(skipping)
    state, shardings = training.init_train_state(exp)
    step = training.compile_train_step(exp, shardings)
    before = jax.tree.map(np.array, state.params)
    state, metrics = step(state, exp.encoders.params, parallel.shard_batch(bad, exp.mesh))
    jax.tree.map(np.testing.assert_array_equal, state.params, before)
    assert int(state.step) == 1
    assert training.summarize([metrics], 1, skip_nonfinite=True)["skipped_nonfinite"] == 1


@pytest.mark.slow
def test_grad_accumulation_and_extra_emas(shapes_data_dir):
    """grad_accum=2 gives the same update as one full batch (SGD: linear in the gradient), and
    each extra EMA follows its own decay."""
    import dataclasses

    import optax

    sgd = optax.sgd(1.0)
    base = tiny(shapes_data_dir, extra_ema_decays=(0.5,), ema_decay=0.9)
    base.text.drop_rates = {"t5": 0.0, "clip": 0.0}
    exp1 = dataclasses.replace(training.build_experiment(base), tx=sgd)
    accum = base.copy_and_resolve_references()
    accum.train.grad_accum = 2
    exp2 = dataclasses.replace(training.build_experiment(accum), tx=sgd)
    batch = parallel.shard_batch(fixed_batch(exp1), exp1.mesh)
    state, _ = training.init_train_state(exp1)
    p0 = jax.tree.map(np.array, state.params)
    out1 = jax.jit(training.make_train_step(exp1))(jax.tree.map(jnp.copy, state), exp1.encoders.params, batch)
    out2 = jax.jit(training.make_train_step(exp2))(jax.tree.map(jnp.copy, state), exp2.encoders.params, batch)
    np.testing.assert_allclose(out1[1]["loss"], out2[1]["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out1[0].params, out2[0].params)
    new = out1[0]
    d_main = float(training.ema_decay_at(jnp.int32(0), 0.9))
    d_extra = float(training.ema_decay_at(jnp.int32(0), 0.5))
    jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, d_main * a + (1 - d_main) * b, rtol=1e-5, atol=1e-7),
                 new.ema_params, p0, new.params)
    jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, d_extra * a + (1 - d_extra) * b, rtol=1e-5, atol=1e-7),
                 new.extra_emas[0], p0, new.params)
    sigma_keys = training.summarize([out1[1]], 1, False)
    assert any(k.startswith("loss/sigma_") for k in sigma_keys)
