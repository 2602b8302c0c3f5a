"""Sharding rules and meshes on 8 fake CPU devices: FSDP placement, explicit rules, validation,
expert stacking, optimizer state, that sharded training computes the same numbers, and a real
two-process (gloo) run over one global mesh."""

import json
import os
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ediff_jax import distributed, experts, parallel, sharding

REPO = Path(__file__).resolve().parents[1]

MIN = 1024  # FSDP threshold (elements) for these small trees


UNET_LIKE_SHAPES = {
    "conv_in": {"kernel": (3, 3, 3, 32), "bias": (32,)},
    "down_0_0": {"conv1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
                 "conv2": {"kernel": (3, 3, 64, 64), "bias": (64,)},
                 "norm1": {"scale": (32,), "bias": (32,)},
                 "emb_proj": {"kernel": (128, 64), "bias": (64,)}},
    "mid_attn": {"qkv": {"kernel": (64, 3, 4, 16), "bias": (3, 4, 16)}},
    "conv_out": {"kernel": (3, 3, 64, 3), "bias": (3,)},
}


def unet_like(seed: int = 0) -> dict:
    """A small UNet-shaped tree (conv, dense, attention kernels, biases, norms) as host arrays.

    Host (numpy) values keep the tests fast: eager or jitted random init on 8 fake devices
    costs tens of seconds of compilation on a busy 2-core machine.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s)).astype(np.float32), UNET_LIKE_SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 4})


@pytest.fixture(scope="module")
def abstract():
    return jax.eval_shape(unet_like)


def specs_by_path(specs: Any) -> dict[str, P]:
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {sharding.path_str(p): s for p, s in flat}


# ----------------------------------------------------------------------------- FSDP


def test_fsdp_shards_large_tensors_on_largest_divisible_axis(mesh, abstract):
    """Big kernels split over `fsdp` on their largest divisible dim (later on ties); small ones replicated."""
    specs = specs_by_path(sharding.param_partition_specs(abstract, sharding.DEFAULT_RULES, mesh, min_size=MIN))
    assert specs["down_0_0/conv1/kernel"] == P(None, None, None, "fsdp")  # 64 > 32
    assert specs["down_0_0/conv2/kernel"] == P(None, None, None, "fsdp")  # tie 64/64: the later (output) dim
    assert specs["down_0_0/emb_proj/kernel"] == P("fsdp")  # 128 > 64
    assert specs["mid_attn/qkv/kernel"] == P("fsdp")  # 64 is the only large divisible dim
    assert specs["conv_in/kernel"] == P()  # 3*3*3*32 = 864 elements < MIN
    for path in ("conv_in/bias", "down_0_0/norm1/scale", "down_0_0/conv1/bias", "mid_attn/qkv/bias"):
        assert specs[path] == P(), path
    assert specs["conv_out/kernel"] == P(None, None, "fsdp")  # 3 is not divisible: 64 is


def test_fsdp_min_size_threshold(mesh, abstract):
    """Tensors below min_size elements are replicated even when divisible."""
    specs = specs_by_path(sharding.param_partition_specs(abstract, sharding.DEFAULT_RULES, mesh, min_size=10_000))
    assert specs["down_0_0/conv1/kernel"] == P(None, None, None, "fsdp")  # 18432 elements
    assert specs["conv_in/kernel"] == P()  # 864
    assert specs["down_0_0/emb_proj/kernel"] == P()  # 8192


def test_fsdp_without_fsdp_axis_replicates(abstract):
    """A mesh without an `fsdp` axis (pure data parallel) keeps the default rule harmless: all replicated."""
    mesh = parallel.make_mesh({"data": -1})
    specs = sharding.param_partition_specs(abstract, sharding.DEFAULT_RULES, mesh, min_size=0)
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_real_unet_params_get_valid_fsdp_specs(mesh):
    """On the repository's UNet, every large tensor with a divisible dim is sharded, and shards divide evenly."""
    from ediff_jax.models import build_model

    model = build_model(dict(name="unet", channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                             cross_attn_resolutions=(8,), num_heads=2, context_dim=32))
    cond = dict(t5=jnp.zeros((1, 5, 12)), t5_mask=jnp.ones((1, 5)), clip=jnp.zeros((1, 4, 10)),
                clip_mask=jnp.ones((1, 4)), clip_pooled=jnp.zeros((1, 10)))
    abstract = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)), cond)["params"],
                              jax.random.key(0))
    specs = sharding.param_partition_specs(abstract, sharding.DEFAULT_RULES, mesh, min_size=4096)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    sharded = 0
    for (path, leaf), spec in zip(flat, spec_leaves):
        name = sharding.path_str(path)
        eligible = leaf.size >= 4096 and any(d % 4 == 0 for d in leaf.shape)
        assert (spec != P()) == eligible, (name, leaf.shape, spec)
        if spec != P():
            sharded += 1
            dim = list(spec).index("fsdp")
            assert leaf.shape[dim] % 4 == 0 and leaf.shape[dim] == max(d for d in leaf.shape if d % 4 == 0), name
    assert sharded >= 5
    by_path = specs_by_path(specs)
    assert by_path["up_1_0/conv1/kernel"] == P(None, None, "fsdp")  # (3, 3, 64, 32): input channels are larger


def test_jit_init_places_shards(mesh, abstract):
    """jit(init, out_shardings=...) materialises each device's slice: FSDP kernels hold 1/4 per device."""
    shardings = sharding.shardings_for_tree(abstract, sharding.DEFAULT_RULES, mesh, min_size=MIN)
    host = unet_like()
    params = jax.jit(lambda: jax.tree.map(jnp.asarray, host), out_shardings=shardings)()
    kernel = params["down_0_0"]["conv2"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 64, 16)
    assert params["down_0_0"]["emb_proj"]["kernel"].addressable_shards[0].data.shape == (32, 64)
    bias = params["down_0_0"]["conv2"]["bias"]
    assert bias.sharding.spec == P() and bias.addressable_shards[0].data.shape == (64,)
    np.testing.assert_array_equal(np.asarray(kernel), host["down_0_0"]["conv2"]["kernel"])
    full = sharding.sharded_bytes_per_device(abstract, jax.tree.map(lambda _: parallel.replicated(mesh), abstract))
    assert sharding.sharded_bytes_per_device(abstract, shardings) < 0.4 * full


# ----------------------------------------------------------------------------- explicit rules


def test_explicit_rules_override_and_first_match_wins(mesh, abstract):
    """An explicit spec, a 'replicate' before the catch-all, and a multi-axis entry apply as written."""
    rules = sharding.rules_from_config([
        ["down_0_0/conv1/kernel", [None, None, "fsdp", None]],  # JSON lists, as from a config file
        ["down_0_0/emb_proj/kernel", [["data", "fsdp"]]],  # 128 split 8 ways
        [".*conv2/kernel", "replicate"],
        [".*conv2/.*", "fsdp"],  # never reached for the kernel: the rule above matched first
    ])
    specs = specs_by_path(sharding.param_partition_specs(abstract, rules, mesh, min_size=MIN))
    assert specs["down_0_0/conv1/kernel"] == P(None, None, "fsdp")
    assert specs["down_0_0/emb_proj/kernel"] == P(("data", "fsdp"))
    assert specs["down_0_0/conv2/kernel"] == P()
    assert specs["conv_out/kernel"] == P(None, None, "fsdp")  # default catch-all appended by rules_from_config


def test_patterns_match_the_whole_path(mesh, abstract):
    """'kernel' alone matches no path ('.../kernel' is needed): full-match semantics, no surprises."""
    with pytest.raises(ValueError, match="No sharding rule matches parameter 'conv_in/bias'"):
        sharding.param_partition_specs(abstract, [("kernel", "replicate")], mesh)


@pytest.mark.parametrize("rules, message", [
    ([("[unclosed", "fsdp")], r"pattern '\[unclosed' is not a valid regular expression"),
    ([(".*", "shard_everything")], r"must be 'replicate' or 'fsdp'"),
    ([(".*", [None, 3])], r"entry 3 must be null, a mesh axis name"),
    (["just-a-string"], r"must be a pair \[regex, rule\]"),
])
def test_malformed_rules_are_rejected(mesh, abstract, rules, message):
    """Rules that cannot be understood fail before any parameter is looked at."""
    with pytest.raises(ValueError, match=message):
        sharding.param_partition_specs(abstract, rules, mesh)


@pytest.mark.parametrize("rule, message", [
    ([None, None, None, "model"], r"mesh axis 'model' does not exist; the mesh has axes \('data', 'fsdp'\)"),
    ([None, None, "fsdp", "fsdp"], r"mesh axis 'fsdp' is used twice"),
    ([None, None, None, None, "fsdp"], r"the spec has 5 entries but the parameter has 4 dimensions"),
    (["fsdp"], r"dimension 0 has size 3, which mesh axes \('fsdp',\) \(size 4\) do not divide"),
])
def test_rules_that_do_not_fit_name_the_parameter(mesh, abstract, rule, message):
    """A rule that cannot apply names the parameter path, its shape and what to change."""
    with pytest.raises(ValueError, match=message) as info:
        sharding.param_partition_specs(abstract, [("down_0_0/conv1/kernel", rule), (".*", "replicate")], mesh)
    assert "'down_0_0/conv1/kernel' of shape (3, 3, 32, 64)" in str(info.value)


# ----------------------------------------------------------------------------- experts


def test_expert_stacked_params_use_expert_axis_and_fsdp_inside():
    """[E, ...] leaves: E on the `expert` mesh axis when divisible, FSDP on the per-expert dims."""
    mesh = parallel.make_mesh({"expert": 2, "fsdp": 4})
    single = jax.eval_shape(unet_like)
    for num_experts, lead in ((2, "expert"), (4, "expert"), (3, None)):
        stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_experts, *x.shape), x.dtype), single)
        specs = specs_by_path(sharding.param_partition_specs(stacked, sharding.DEFAULT_RULES, mesh, min_size=MIN,
                                                            stacked_experts=True))
        assert specs["down_0_0/conv2/kernel"] == P(lead, None, None, None, "fsdp"), num_experts
        assert specs["down_0_0/conv2/bias"] == (P("expert") if lead else P()), num_experts
    # explicit rules describe the per-expert shape, so one rule list serves both layouts
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2, *x.shape), x.dtype), single)
    specs = specs_by_path(sharding.param_partition_specs(
        stacked, [("down_0_0/conv1/kernel", (None, None, "fsdp")), (".*", "replicate")], mesh, stacked_experts=True))
    assert specs["down_0_0/conv1/kernel"] == P("expert", None, None, "fsdp")
    assert specs["conv_in/bias"] == P("expert")


def test_expert_stacked_jit_init_shard_shapes():
    """A stacked init under these shardings puts one expert and a quarter of a kernel on each device."""
    mesh = parallel.make_mesh({"expert": 2, "fsdp": 4})
    host = jax.tree.map(lambda a, b: np.stack([a, b]), unet_like(0), unet_like(1))
    init = lambda: jax.tree.map(jnp.asarray, host)
    abstract = jax.eval_shape(init)
    shardings = sharding.shardings_for_tree(abstract, sharding.DEFAULT_RULES, mesh, min_size=MIN,
                                            stacked_experts=True)
    params = jax.jit(init, out_shardings=shardings)()
    kernel = params["down_0_0"]["conv2"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (1, 3, 3, 64, 16)
    np.testing.assert_array_equal(np.asarray(kernel), host["down_0_0"]["conv2"]["kernel"])


# ----------------------------------------------------------------------------- optimizer state


def trainer_like_optimizer() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b1=0.9, b2=0.99, weight_decay=0.01))


def test_text_encoders_are_split_over_fsdp_and_encode_as_on_one_device():
    """`build_experiment` loads the encoders onto its mesh as `sharding.encoder_shardings` says (FSDP: on
    data 2 x fsdp 4 with no size threshold, every weight with a dimension divisible by 4 is split in
    quarters, the others replicated), whatever the UNet's rules; the embedding cache built from them equals
    the one built from weights on one device, and comes back to the host whole."""
    from ediff_jax.config_utils import load_config
    from ediff_jax.text.cache import encode_captions
    from ediff_jax.text.conditioning import load_text_encoders
    from ediff_jax.training import build_experiment

    config = load_config(str(REPO / "configs/base64.py:size=tiny"))
    config.mesh.data, config.mesh.fsdp = 2, 4
    config.sharding.fsdp_min_size = 0
    config.sharding.rules = ((".*", "replicate"),)  # the UNet's rules do not reach the encoders
    exp = build_experiment(config)
    leaves = jax.tree.leaves(exp.encoders.params)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    for x in leaves:
        assert x.sharding.mesh == exp.mesh
        split = any(d % 4 == 0 for d in x.shape)
        assert ("fsdp" in str(x.sharding.spec)) == split, (x.shape, x.sharding.spec)
        assert x.addressable_shards[0].data.size * (4 if split else 1) == x.size
    assert sharding.sharded_bytes_per_device(exp.encoders.params, jax.tree.map(lambda x: x.sharding, leaves)) < total
    captions = ["a red circle", "a blue square to the left of a green triangle", "a purple circle at the top"]
    placed = encode_captions(exp.encoders, captions, batch_size=4)
    one_device = encode_captions(load_text_encoders(config.text), captions, batch_size=4)
    assert placed.captions == one_device.captions
    for key, value in one_device.arrays.items():
        assert isinstance(placed.arrays[key], np.ndarray)
        np.testing.assert_allclose(placed.arrays[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_optimizer", [True, False])
def test_opt_state_mirrors_params(mesh, abstract, use_optimizer):
    """Adam's mu/nu take their parameter's spec (structurally or by path suffix); the count is replicated."""
    tx = trainer_like_optimizer()
    specs = sharding.param_partition_specs(abstract, sharding.DEFAULT_RULES, mesh, min_size=MIN)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    out = sharding.opt_state_shardings(abstract_opt, abstract, specs, mesh,
                                       optimizer=tx if use_optimizer else None)
    adam_state = out[1][0]
    assert adam_state.count.spec == P()
    for moment in (adam_state.mu, adam_state.nu):
        got = jax.tree.map(lambda s: s.spec, moment)
        assert got == specs
    assert specs["down_0_0"]["conv2"]["kernel"] == P(None, None, None, "fsdp")  # the check above is not vacuous


def test_opt_state_of_vmapped_expert_optimizer(mesh):
    """The vmapped (per-expert) optimizer state mirrors stacked params; counts [E] are replicated."""
    mesh = parallel.make_mesh({"expert": 2, "fsdp": 4})
    tx = trainer_like_optimizer()
    stacked = jax.eval_shape(lambda: experts.stack_experts([unet_like()] * 2))
    specs = sharding.param_partition_specs(stacked, sharding.DEFAULT_RULES, mesh, min_size=MIN, stacked_experts=True)
    abstract_opt = jax.eval_shape(jax.vmap(tx.init), stacked)
    for optimizer in (tx, None):
        out = sharding.opt_state_shardings(abstract_opt, stacked, specs, mesh, optimizer=optimizer)
        assert out[1][0].count.spec == P()
        assert out[1][0].mu["down_0_0"]["conv2"]["kernel"].spec == P("expert", None, None, None, "fsdp")


@flax.struct.dataclass
class State:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def test_train_state_shardings_cover_every_field(mesh, abstract):
    """One call shards params, EMA (a dict of decays here), optimizer state; step and rng replicated."""
    tx = trainer_like_optimizer()
    state = State(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract,
                  ema_params={"0.999": abstract, "0.9999": abstract},
                  opt_state=jax.eval_shape(tx.init, abstract), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    out = sharding.train_state_shardings(state, sharding.DEFAULT_RULES, mesh, optimizer=tx, min_size=MIN)
    want = P(None, None, None, "fsdp")
    assert out.params["down_0_0"]["conv2"]["kernel"].spec == want
    assert out.ema_params["0.9999"]["down_0_0"]["conv2"]["kernel"].spec == want
    assert out.opt_state[1][0].nu["down_0_0"]["conv2"]["kernel"].spec == want
    assert out.step.spec == P() and out.rng.spec == P()
    assert "down_0_0/conv2/kernel" in sharding.sharding_summary(abstract, sharding.param_partition_specs(
        abstract, sharding.DEFAULT_RULES, mesh, min_size=MIN), mesh)


# ----------------------------------------------------------------------------- numerics


def test_sharded_adam_step_matches_unsharded(mesh, abstract):
    """Loss, gradients and an AdamW update under FSDP + data shardings equal the single-device result."""
    tx = trainer_like_optimizer()
    params = jax.tree.map(jnp.asarray, unet_like())
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 128)), jnp.float32)  # 16 = 2 data x 4 fsdp x 2

    def loss_fn(p: Any, x: jax.Array) -> jax.Array:
        h = jnp.tanh(x @ p["down_0_0"]["emb_proj"]["kernel"] + p["down_0_0"]["emb_proj"]["bias"])  # [B, 64]
        w = p["down_0_0"]["conv2"]["kernel"].reshape(-1, 64)[:64]  # [64, 64]
        h = jnp.tanh(h @ w + p["down_0_0"]["conv2"]["bias"])
        q = jnp.einsum("bc,cthd->bthd", h, p["mid_attn"]["qkv"]["kernel"]) + p["mid_attn"]["qkv"]["bias"]
        return jnp.mean(q ** 2) + 1e-3 * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(p))

    def step(p: Any, opt_state: Any, x: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = jax.jit(tx.init)(params)
    ref = jax.jit(step)(params, opt_state, x)

    p_shard = sharding.shardings_for_tree(abstract, sharding.DEFAULT_RULES, mesh, min_size=MIN)
    o_shard = sharding.opt_state_shardings(jax.eval_shape(tx.init, abstract), abstract,
                                           jax.tree.map(lambda s: s.spec, p_shard), mesh, optimizer=tx)
    rep = parallel.replicated(mesh)
    sharded_step = jax.jit(step, in_shardings=(p_shard, o_shard, parallel.batch_sharding(mesh)),
                           out_shardings=(p_shard, o_shard, rep))
    out = sharded_step(jax.device_put(params, p_shard), jax.device_put(opt_state, o_shard),
                       jax.device_put(x, parallel.batch_sharding(mesh)))
    assert out[0]["down_0_0"]["conv2"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    np.testing.assert_allclose(out[2], ref[2], rtol=1e-5)
    # Adam's first step is ~lr * sign(g): summation-order noise in a near-zero gradient moves a
    # parameter by up to ~1e-6, so parameters are compared to 1% of one step (lr = 1e-3).
    for got, want in zip(jax.tree.leaves(out[:2]), jax.tree.leaves(ref[:2])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- meshes


def test_mesh_several_axes_with_autofill_and_batch_over_data_and_fsdp():
    """{data: -1, fsdp: 2, expert: 2} on 8 devices -> data 2; the batch splits over data and fsdp only."""
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "expert": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2}
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert parallel.data_parallel_size(mesh) == 4
    batch = parallel.shard_batch(np.arange(8, dtype=np.float32), mesh)
    assert batch.addressable_shards[0].data.shape == (2,)
    subset = jax.devices()[4:][::-1]  # a caller-chosen subset keeps the caller's order, as before
    assert list(parallel.make_mesh({"data": -1}, subset).devices.flat) == subset


def test_mesh_axes_can_be_set_on_the_command_line(tmp_path):
    """`--config.mesh.fsdp=N` on the locked CLI config (README's pod command) reaches the mesh (was: "invalid
    --config override ('fsdp')"); left unset, fsdp and expert are not axes at all."""
    import subprocess
    import sys

    from ediff_jax.config_utils import base_config

    result = subprocess.run([sys.executable, "-m", "ediff_jax.train", "--config", "configs/base64.py:size=tiny",
                             "--config.mesh.fsdp=3", "--config.mesh.expert=1", f"--workdir={tmp_path / 'w'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config.mesh {'data': -1, 'expert': 1, 'fsdp': 3} does not divide the 8 available devices" in result.stderr
    assert dict(parallel.make_mesh(base_config().mesh.to_dict()).shape) == {"data": 8}


def test_dcn_axes_emulated_on_one_slice():
    """A `dcn` sub-dict multiplies its axes (slice-major); on one CPU 'slice' the layout is emulated."""
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "dcn": {"data": 2}})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # slice 0 = devices 0..3 and slice 1 = devices 4..7; data's major part is the slice index
    np.testing.assert_array_equal(ids, [[0, 1], [2, 3], [4, 5], [6, 7]])
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "dcn": {"fsdp": 2}})
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids, [[0, 1, 4, 5], [2, 3, 6, 7]])  # fsdp's major half = the slice


@pytest.mark.parametrize("config, message", [
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": 3}, "does not divide the 8 available devices"),
    ({"data": 2, "fsdp": 2}, "uses 4 devices but 8 are available"),
    ({"data": -1, "dcn": {"model": 2}}, r"config.mesh.dcn names axes \['model'\]"),
    ({"data": -1, "dcn": {"data": 3}}, "do not split evenly into 3"),
])
def test_bad_mesh_configs_are_explained(config, message):
    """Mesh configs that cannot be built say why."""
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(config)


def test_train_state_shardings_needs_a_dataclass():
    """train_state_shardings refuses non-dataclass states with a clear TypeError."""
    mesh = parallel.make_mesh({"data": -1})
    with pytest.raises(TypeError, match="expects a dataclass state"):
        sharding.train_state_shardings({"params": {}}, sharding.DEFAULT_RULES, mesh)


# ----------------------------------------------------------------------------- multi-process

WORKER = r'''
import json
from ediff_jax import distributed

assert distributed.initialize(), "EDIFF_* variables were set: initialize() must join the job"
assert distributed.initialize()  # idempotent
import jax
import jax.numpy as jnp
import numpy as np
from ediff_jax import parallel

mesh = parallel.make_mesh({"data": 2, "fsdp": -1})  # global mesh over both processes' devices
pid, n = jax.process_index(), jax.process_count()
rows = 8 // n
local = (np.arange(rows * 3, dtype=np.float32) + pid * rows * 3).reshape(rows, 3)
batch = parallel.shard_batch(local, mesh)  # the global batch: both processes' rows, over (data, fsdp)
total = jax.jit(jnp.sum, out_shardings=parallel.replicated(mesh))(batch)
print("RESULT " + json.dumps({"pid": pid, "n": n, "devices": len(jax.devices()), "local": len(jax.local_devices()),
                              "global_shape": list(batch.shape), "total": float(total),
                              "main": distributed.is_main_process()}))
'''


def test_two_processes_share_a_global_mesh(tmp_path):
    """Two CPU processes (2 devices each) join via gloo; a global batch built from each process's rows
    sums, across processes, to the sum of all rows."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    start = time.perf_counter()
    results = distributed.launch_local_processes([str(script)], num_processes=2, devices_per_process=2,
                                                 timeout=120, cwd=os.getcwd())
    outputs = [json.loads(line.split("RESULT ", 1)[1]) for r in results for line in r.output.splitlines()
               if line.startswith("RESULT ")]
    assert sorted(o["pid"] for o in outputs) == [0, 1]
    for o in outputs:
        assert (o["n"], o["devices"], o["local"], o["global_shape"]) == (2, 4, 2, [8, 3])
        assert o["total"] == float(np.arange(24).sum())
        assert o["main"] == (o["pid"] == 0)
    print(f"2-process run: {time.perf_counter() - start:.1f} s")


def test_initialize_is_a_no_op_for_one_process_and_checks_partial_settings(monkeypatch):
    """No EDIFF_* variables and no cluster: single process, nothing started; partial settings are refused."""
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
                 "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    missing = r"not \['num_processes', 'process_id'\].*EDIFF_NUM_PROCESSES, EDIFF_PROCESS_ID"
    with pytest.raises(ValueError, match=missing):
        distributed.initialize()
    assert not distributed.is_initialized()
    assert distributed.is_main_process()
