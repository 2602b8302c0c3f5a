"""Silent failures found in review, each pinned by a test (issue #21):

1. experts train on rows of every host, not on a fixed part of the dataset;
2. every expert phase's batch split is checked before phase 0 trains;
3. read-only commands never touch `checkpoints/`, restore only the EMA they need, and
   only damage (not an OOM) makes a checkpoint count as unreadable;
4. a resume refuses changes it depends on, warns on others, and keeps a config history;
5. text-dropout rates are validated;
6. a NaN in one expert skips only that expert's update.
"""

import json
import shutil
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from ediff_jax import distributed, experts, parallel, training
from ediff_jax.checkpoints import CheckpointReadError, Checkpointer
from ediff_jax.config_utils import load_config, validate_config
from ediff_jax.resume_policy import RESUME_RULES, ResumeChangeError, flatten, key_class
from helpers import tiny_train_config

REPO = Path(__file__).resolve().parents[1]


def tiny(data_dir: str, **train):
    return tiny_train_config(data_dir, **{"ckpt_every": 2, **train})


def two_experts(data_dir: str, **train):
    """One phase of two experts (equal halves of p(sigma)), trained from scratch."""
    c = tiny(data_dir, **train)
    c.experts.phases = (((0.0, 0.5), (0.5, 1.0)),)
    c.experts.phase_steps = (int(c.train.num_steps),)
    return c


def snapshot(directory: Path) -> dict:
    """Every path under `directory` with its size and mtime: any write, rename or new file shows."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


# --- 1. experts see every host's data ---------------------------------------------------

def test_expert_shares_are_strided_and_invert():
    """Expert k gets rows k, k+E, ...: from a batch laid out host by host, every expert has
    an equal number of rows of every host."""
    hosts, per_host, e = 2, 6, 3
    rows = np.arange(hosts * per_host)
    shares = np.asarray(experts.expert_shares(rows, e))
    assert shares.shape == (e, hosts * per_host // e)
    np.testing.assert_array_equal(shares[1], [1, 4, 7, 10])
    for k in range(e):
        assert np.bincount(shares[k] // per_host, minlength=hosts).tolist() == [per_host // e] * hosts
    np.testing.assert_array_equal(np.sort(shares.reshape(-1)), rows)


SHARES_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    sys.path.insert(0, {tests!r})
    from ediff_jax import distributed
    distributed.initialize()
    from test_trustworthy_runs import expert_ids_over_an_epoch
    ids = expert_ids_over_an_epoch({data_dir!r})
    if jax.process_index() == 0:
        np.save({out!r}, ids)
""")


def expert_ids_over_an_epoch(data_dir: str) -> np.ndarray:
    """[steps, experts, rows] example indices each expert trains on, over one pass of the
    validation split (1000 examples), read exactly as training reads its batches."""
    from ediff_jax.data import pipeline

    config = two_experts(data_dir)
    config.train.batch_size = 8
    config.data.shuffle_buffer = 1000
    builder = pipeline.get_dataset_builder("ediff_shapes/32", data_dir)
    data = training.train_iterator(config, builder, 0, split="validation")
    mesh = parallel.make_mesh({"data": -1})
    split = jax.jit(lambda ids: experts.expert_shares(ids, 2), out_shardings=parallel.replicated(mesh))
    steps = 1000 // 8
    out = []
    for _ in range(steps):
        ids = parallel.shard_batch(np.asarray(next(data)["index"], np.int32), mesh)
        out.append(np.asarray(split(ids).addressable_data(0)))
    return np.stack(out)


def test_each_expert_trains_on_every_hosts_shard(shapes_data_dir, tmp_path):
    """2 processes (gloo) read disjoint halves of the split. Over one epoch every example is
    trained on exactly once and each expert gets 250 examples of each host's 500; one
    process gives each expert the same number, 500, and also covers the split once. With
    contiguous shares, expert 0 would only ever see host 0's half of the dataset."""
    script = tmp_path / "worker.py"
    out = tmp_path / "two.npy"
    script.write_text(SHARES_WORKER.format(tests=str(REPO / "tests"), data_dir=shapes_data_dir, out=str(out)))
    distributed.launch_local_processes([str(script)], num_processes=2, devices_per_process=2, timeout=300,
                                       cwd=str(REPO))
    two = np.load(out)
    one = expert_ids_over_an_epoch(shapes_data_dir)
    for ids in (two, one):
        assert np.array_equal(np.sort(ids.reshape(-1)), np.arange(1000))  # every example once per epoch
        assert [ids[:, k].size for k in range(2)] == [500, 500]
    for k in range(2):
        host_of = two[:, k].reshape(-1) // 500  # host 0 reads examples [0, 500), host 1 [500, 1000)
        assert np.bincount(host_of, minlength=2).tolist() == [250, 250]


# --- 2. every phase's batch split is checked at start-up --------------------------------

def test_grad_accum_is_checked_for_every_phase(shapes_data_dir):
    """experts=3 at batch 24: phase 2 gives each expert 8 rows and phase 1 12; grad_accum=8
    fits phase 2 but not phase 1, which used to fail only when phase 1 compiled."""
    c = load_config(str(REPO / "configs/experts.py:experts=3"))
    c.data.data_dir = shapes_data_dir
    c.train.batch_size, c.train.grad_accum = 24, 8
    with pytest.raises(ValueError, match=r"grad_accum=8 must divide the 12 examples .* 2 experts of phase 1"):
        training.build_experiment(c)
    c.train.grad_accum = 4  # divides 24, 12 and 8
    training.build_experiment(c)


def test_batch_split_over_processes_is_checked(shapes_data_dir):
    c = two_experts(shapes_data_dir)
    c.train.batch_size = 12
    with pytest.raises(ValueError, match=r"each of the 4 processes 3 examples, not divisible by the 2 experts"):
        training.experiment._check_batch_splits(c, training.experiment._expert_phases(c)[0], process_count=4)
    training.experiment._check_batch_splits(c, training.experiment._expert_phases(c)[0], process_count=2)
    c.train.batch_size = 3  # one process: an uneven split is padded (tests/test_experts.py)...
    training.experiment._check_batch_splits(c, training.experiment._expert_phases(c)[0], process_count=1)
    c.train.batch_size = 1  # ...but each expert needs a row
    with pytest.raises(ValueError, match=r"batch_size=1 is smaller than the 2 experts of phase 0.*at least 2"):
        training.experiment._check_batch_splits(c, training.experiment._expert_phases(c)[0], process_count=1)


# --- 3. read-only commands, partial restore, damage vs other errors ---------------------

@pytest.fixture(scope="module")
def trained(shapes_data_dir, tmp_path_factory):
    """A 4-step run (checkpoints at 2 and 4) with one extra EMA; tests copy it before changing it."""
    workdir = tmp_path_factory.mktemp("trained") / "wd"
    training.train_and_evaluate(tiny(shapes_data_dir, extra_ema_decays=(0.2,)), workdir)
    return workdir


def copy_of(workdir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "wd"
    shutil.copytree(workdir, target)
    return target


def test_picking_an_ema_still_in_its_warm_up_warns(trained):
    """The warm-up caps every decay at (1 + t) / (10 + t): at step 4 the configured decay has not taken
    effect, so that EMA equals any other of decay >= 4/13 (a 60-minute run's 0.999 and 0.9995 did)."""
    from ediff_jax.workdirs import load_workdir, read_workdir_config, warn_if_ema_in_warmup

    decay = float(read_workdir_config(trained).train.ema_decay)
    with pytest.warns(UserWarning, match=rf"EMA decay {decay:g} has not taken effect by step 4: .* at 0\.3077"):
        load_workdir(trained, ema_decay=decay)
    with pytest.warns(UserWarning, match="until step 17991"):  # the first t with t / (t + 9) >= 0.9995
        warn_if_ema_in_warmup(0.9995, 6455)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_ema_in_warmup(0.999, 9000)  # cap 9000/9009 > 0.999: in effect


def test_sampling_restores_only_the_chosen_ema_and_writes_nothing(shapes_data_dir, trained, monkeypatch):
    """load_workdir asks orbax for one field of the state, the one EMA it samples with, and
    the checkpoint tree is byte- and mtime-identical afterwards."""
    from ediff_jax.workdirs import load_workdir

    asked = []
    original = Checkpointer.restore_fields
    monkeypatch.setattr(Checkpointer, "restore_fields",
                        lambda self, step, fields: asked.append((step, sorted(fields))) or original(self, step, fields))
    before = snapshot(trained / "checkpoints")
    _, _, ema = load_workdir(trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.2 took effect at step 4 (cap 4/13): no warning
        _, _, extra = load_workdir(trained, ema_decay=0.2)
    assert asked == [(4, ["ema_params"]), (4, ["extra_emas"])]
    assert snapshot(trained / "checkpoints") == before
    # The restored trees are the saved ones: compare with a full restore of step 4.
    exp = training.build_experiment(tiny(shapes_data_dir, extra_ema_decays=(0.2,)))
    full = Checkpointer(trained, read_only=True)
    abstract, _, _ = training.checked_abstract_state(exp, full, full.read_meta(4))
    state = full.restore(abstract, 4)
    jax.tree.map(np.testing.assert_array_equal, ema, state.ema_params)
    jax.tree.map(np.testing.assert_array_equal, extra, state.extra_emas[0])
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(extra)))


def test_a_model_samples_only_with_the_encoders_it_was_trained_with(shapes_data_dir, trained, tmp_path):
    """Checkpoints record each encoder's path and weights' sha256; pointing the workdir's
    config at other weights (here the older random T5) is refused, naming both."""
    from ediff_jax.checkpoints import CheckpointMismatchError
    from ediff_jax.workdirs import load_workdir
    from ediff_jax.text.loading import resolve_text_path, weights_fingerprint

    workdir = copy_of(trained, tmp_path)
    ckpt = Checkpointer(workdir, read_only=True)
    recorded = ckpt.read_meta(4)["progress"]["text_encoders"]
    ckpt.close()
    assert recorded["t5"] == {"path": "builtin:t5_shapes_v2",
                              "sha256": weights_fingerprint(resolve_text_path("builtin:t5_shapes_v2"))}
    config = json.loads((workdir / "config.json").read_text())
    config["text"]["t5_path"] = "builtin:t5_shapes"
    (workdir / "config.json").write_text(json.dumps(config))
    mismatch = r"trained with the t5 encoder 'builtin:t5_shapes_v2'.*t5_path='builtin:t5_shapes' loads different weights"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        load_workdir(workdir)
    # Resuming with them is refused too, even when the path change itself is allowed.
    c = tiny(shapes_data_dir, extra_ema_decays=(0.2,), num_steps=6, allow_resume_change="text.t5_path")
    c.text.t5_path = "builtin:t5_shapes"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        training.train_and_evaluate(c, workdir)


def test_a_checkpoint_from_before_a_model_key_samples_and_resumes(shapes_data_dir, trained, tmp_path):
    """A model key added to the code (model.coord_input) is absent from older checkpoints' metadata
    and config: they must still sample and resume, since the key's default is what the old code did.
    Set to anything else, it is compared: such a checkpoint does not load as the plain model."""
    from ediff_jax.checkpoints import CheckpointMismatchError
    from ediff_jax.workdirs import load_workdir

    workdir = copy_of(trained, tmp_path)
    for meta_file in (workdir / "checkpoints").glob("*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        meta["model"].pop("coord_input", None)
        meta["progress"]["config"]["model"].pop("coord_input")
        meta_file.write_text(json.dumps(meta))
    config = json.loads((workdir / "config.json").read_text())
    config["model"].pop("coord_input")
    (workdir / "config.json").write_text(json.dumps(config))
    load_workdir(workdir)
    training.train_and_evaluate(tiny(shapes_data_dir, extra_ema_decays=(0.2,), num_steps=6), workdir)
    assert Checkpointer(workdir, read_only=True).all_steps()[-1] == 6
    assert "coord_input" not in training.model_meta(tiny(shapes_data_dir))["model"]
    c = tiny(shapes_data_dir, extra_ema_decays=(0.2,), num_steps=8)
    c.model.coord_input = True
    with pytest.raises(CheckpointMismatchError, match="model.coord_input: checkpoint has None, config has True"):
        training.train_and_evaluate(c, workdir)


def inject(monkeypatch, method: str, step: int, message: str) -> None:
    """Makes Checkpointer.<method> raise like orbax does (a plain Exception wrapping a
    TensorStore ValueError) when it reads `step`."""
    original = getattr(Checkpointer, method)

    def failing(self, *args):
        if step in args:
            try:
                raise ValueError(message)
            except ValueError as cause:
                raise Exception("Encountered error while reading array index") from cause
        return original(self, *args)

    monkeypatch.setattr(Checkpointer, method, failing)


def test_an_oom_is_reported_not_treated_as_damage(shapes_data_dir, trained, tmp_path, monkeypatch):
    """RESOURCE_EXHAUSTED on the newest step: sampling and training both stop naming the step
    and the error, and neither renames, moves or writes anything in checkpoints/."""
    from ediff_jax.workdirs import load_workdir

    workdir = copy_of(trained, tmp_path)
    before = snapshot(workdir / "checkpoints")
    inject(monkeypatch, "restore_fields", 4, "RESOURCE_EXHAUSTED: Out of memory allocating 1.2GiB")
    with pytest.raises(CheckpointReadError, match=r"step 4 .*RESOURCE_EXHAUSTED.*not damage"):
        load_workdir(workdir)
    inject(monkeypatch, "restore", 4, "RESOURCE_EXHAUSTED: Out of memory allocating 1.2GiB")
    with pytest.raises(CheckpointReadError, match=r"step 4 .*RESOURCE_EXHAUSTED"):
        training.train_and_evaluate(tiny(shapes_data_dir, extra_ema_decays=(0.2,), num_steps=6), workdir)
    assert snapshot(workdir / "checkpoints") == before


def test_damage_is_skipped_read_only_and_set_aside_only_by_training(shapes_data_dir, trained, tmp_path, monkeypatch):
    """A DATA_LOSS read of step 4: sampling warns and uses step 2, leaving the tree as it was;
    training then moves step 4 aside (kept) and resumes from step 2."""
    from ediff_jax.workdirs import load_workdir

    workdir = copy_of(trained, tmp_path)
    before = snapshot(workdir / "checkpoints")
    inject(monkeypatch, "restore_fields", 4, "DATA_LOSS: Error decoding manifest")
    with pytest.warns(UserWarning, match=r"step 4 .* damaged .*using step 2"):
        load_workdir(workdir)
    assert snapshot(workdir / "checkpoints") == before
    inject(monkeypatch, "restore", 4, "DATA_LOSS: Error decoding manifest")
    with pytest.warns(UserWarning, match=r"step 4 .* moved it to"):
        state = training.train_and_evaluate(tiny(shapes_data_dir, extra_ema_decays=(0.2,)), workdir, stop_after=3)
    assert int(state.step) == 3
    assert (workdir / "checkpoints" / "unreadable_4").is_dir()


def test_damage_reason_reads_orbax_and_tensorstore_errors():
    import json as _json

    from ediff_jax.checkpoints import damage_reason

    def wrapped(message):
        try:
            raise ValueError(message)
        except ValueError as cause:
            try:
                raise Exception("Encountered error while reading array index") from cause
            except Exception as e:
                return e

    assert "OUT_OF_RANGE" in damage_reason(wrapped("OUT_OF_RANGE: Requested byte range [0, 2291) is not valid"))
    assert damage_reason(_json.JSONDecodeError("Expecting value", "", 0)).startswith("invalid JSON")
    assert damage_reason(wrapped("RESOURCE_EXHAUSTED: Out of memory")) is None
    assert damage_reason(wrapped("UNAVAILABLE: connection reset")) is None
    assert damage_reason(MemoryError()) is None


# --- 4. what a resume accepts --------------------------------------------------------

def test_every_config_key_has_a_resume_rule():
    from ediff_jax.config_utils import base_config

    keys = flatten(base_config().to_dict())
    classes = {k: key_class(k) for k in keys}  # raises for a key without a rule
    assert classes["train.batch_size"] == classes["edm.p_mean"] == classes["seed"] == "must_match"
    assert classes["train.lr"] == "warn" and classes["model.remat"] == classes["model.dtype"] == "free"
    assert key_class("process_count") == "must_match"
    assert all(cls in ("must_match", "warn", "free") for _, cls in RESUME_RULES)


@pytest.mark.parametrize("key,value,old,new", [
    ("train.batch_size", 16, "8", "16"),
    ("edm.p_mean", -1.0, "-1.2", "-1.0"),
    ("seed", 3, "0", "3"),
])
def test_resume_refuses_a_change_it_depends_on(shapes_data_dir, trained, tmp_path, key, value, old, new):
    workdir = copy_of(trained, tmp_path)
    before = snapshot(workdir)
    c = tiny(shapes_data_dir, extra_ema_decays=(0.2,), num_steps=6)
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(ResumeChangeError, match=rf"(?s){key}: {old} -> {new}.*allow_resume_change={key}"):
        training.train_and_evaluate(c, workdir)
    assert snapshot(workdir) == before  # config.json and the history are not touched either


def test_resume_names_a_changed_extra_ema_clearly(shapes_data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    with pytest.raises(ResumeChangeError, match=r"train.extra_ema_decays: \[0.2\] -> \[0.2, 0.9\].*cannot be added"):
        training.train_and_evaluate(tiny(shapes_data_dir, extra_ema_decays=(0.2, 0.9)), workdir)


def test_resume_warns_frees_and_accepts_on_purpose(shapes_data_dir, trained, tmp_path):
    """A new lr warns; remat and dtype pass silently (they used to be refused); a forced
    p_mean change is accepted and recorded. config.json is the latest config and
    config_history/ keeps one file per run, so the original settings are never lost."""
    workdir = copy_of(trained, tmp_path)
    c = tiny(shapes_data_dir, extra_ema_decays=(0.2,))
    c.train.lr = 1e-3
    c.model.remat = True
    c.model.dtype = "bfloat16"
    c.edm.p_mean = -1.0
    c.train.allow_resume_change = "edm.p_mean"
    with pytest.warns(UserWarning) as caught:
        training.train_and_evaluate(c, workdir)
    messages = [str(w.message) for w in caught]
    assert any("train.lr: 0.002 -> 0.001" in m for m in messages)
    assert any("edm.p_mean changed from -1.2 to -1.0" in m for m in messages)
    assert not any("remat" in m or "dtype" in m for m in messages)
    history = sorted((workdir / "config_history").glob("*.json"))
    assert len(history) == 2
    first, last = (json.loads(p.read_text()) for p in history)
    assert first["config"]["edm"]["p_mean"] == -1.2 and first["start_step"] == 0
    assert last["accepted_changes"] == {"edm.p_mean": [-1.2, -1.0]} and last["start_step"] == 4
    assert json.loads((workdir / "config.json").read_text())["edm"]["p_mean"] == -1.0


def test_allow_resume_change_must_name_real_keys(shapes_data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    c = tiny(shapes_data_dir, extra_ema_decays=(0.2,))
    c.train.allow_resume_change = "edm.pmean"
    with pytest.raises(ValueError, match=r"\['edm.pmean'\], which are not config keys"):
        training.train_and_evaluate(c, workdir)


# --- 5. text-dropout rates -----------------------------------------------------------

@pytest.mark.parametrize("rates,match", [
    ({"T5": 0.25, "clip": 0.2}, r"text.drop_rates.T5 \(did you mean 'text.drop_rates.t5'\?\)"),
    ({"t5": 1.5, "clip": 0.2}, r"drop_rates.t5=1.5 is not a probability"),
    ({"t5": -0.1, "clip": 0.2}, r"drop_rates.t5=-0.1 is not a probability"),
])
def test_drop_rates_are_validated(shapes_data_dir, rates, match):
    c = tiny(shapes_data_dir)
    c.text.drop_rates = rates
    with pytest.raises(ValueError, match=match):
        validate_config(c)


# --- 6. a NaN in one expert --------------------------------------------------------------

def test_nan_in_one_expert_skips_only_that_expert(shapes_data_dir):
    """Experts are independent runs: with NaN images in expert 0's rows, expert 0 keeps its
    weights and optimizer state, and expert 1's update is bitwise the one it makes when
    expert 0's rows are clean."""
    c = two_experts(shapes_data_dir, skip_nonfinite=True)
    exp = training.build_experiment(c)
    rng = np.random.default_rng(0)
    clean = {"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
             **exp.encoders.tokenize(["a red circle", "a blue square"] * 4)}
    bad = {**clean, "image": clean["image"].copy()}
    bad["image"][0::2] = np.nan  # expert 0's share: rows 0, 2, 4, 6
    results = {}
    step = None
    for name, batch in (("clean", clean), ("bad", bad)):
        state, shardings = training.init_train_state(exp)
        before = jax.tree.map(np.array, (state.params, state.opt_state))
        step = step or training.compile_train_step(exp, shardings)
        state, metrics = step(state, exp.encoders.params, parallel.shard_batch(batch, exp.mesh))
        results[name] = (before, jax.tree.map(np.array, (state.params, state.opt_state)), metrics)
    (before, (params, opt), metrics), (_, (clean_params, _), _) = results["bad"], results["clean"]
    assert int(metrics["nonfinite"]) == 1
    take = lambda tree, k: jax.tree.map(lambda x: x[k], tree)  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, take(params, 0), take(before[0], 0))
    jax.tree.map(np.testing.assert_array_equal, take(opt, 0), take(before[1], 0))
    jax.tree.map(np.testing.assert_array_equal, take(params, 1), take(clean_params, 1))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(take(params, 1)),
                                                         jax.tree.leaves(take(before[0], 1))))
    assert training.summarize([metrics], 1, skip_nonfinite=True)["skipped_nonfinite"] == 1
