"""`python -m ediff_jax.plan`: the HLO reader against hand-written programs, the abstract encoders against
the real ones, and one real compile of the tiny config for v5e:2x2 (where libtpu is installed).

The compile test checks the plan against figures computed independently: the parameter bytes per
chip against the model's parameter count and the mesh, FLOPs per image against the CPU compile of the
same step, and the collective kinds that data parallelism must produce.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ediff_jax.plan import hlo
from ediff_jax.plan.chips import chip_for

REPO = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

HLO = """
HloModule step
%region.0 (a: f32[], b: f32[]) -> f32[] { ... }
ENTRY %main {
  %p0 = f32[256,128]{1,0} parameter(0)
  %ag-start = (f32[64,128]{1,0}, f32[256,128]{1,0}) all-gather-start(%p0.1), replica_groups={{0,1,2,3}}, dimensions={0}
  %ag-done = f32[256,128]{1,0:T(8,128)} all-gather-done(%ag-start)
  %ar = (bf16[1024]{0}, f32[16]{0}) all-reduce(%g, %h), replica_groups=[2,2]<=[4], to_apply=%region.0
  %rs = f32[64,128]{1,0} reduce-scatter(%x), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%region.0
  %cp = s8[100]{0} collective-permute(%y), source_target_pairs={{0,1},{1,0}}
  ROOT %t = (f32[]) tuple(%z)
}
"""


def test_collectives_are_counted_once_with_their_bytes_and_ring_traffic():
    """The async pair counts once (its -done, with the -start's groups); tuples add; ring formulas per kind."""
    out = hlo.collectives(HLO, num_devices=4)
    ag, ar, rs, cp = (out[k] for k in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute"))
    assert ag == {"count": 1, "result_bytes": 256 * 128 * 4, "wire_bytes": 256 * 128 * 4 * 3 / 4}
    assert ar["count"] == 1 and ar["result_bytes"] == 1024 * 2 + 16 * 4
    assert ar["wire_bytes"] == 2 * (1024 * 2 + 16 * 4) * 1 / 2  # groups of 2
    assert rs["wire_bytes"] == 64 * 128 * 4 * 3  # the input is 4x the result
    assert cp["wire_bytes"] == 100 and out["all-to-all"]["count"] == 0
    assert hlo.shape_bytes("(bf16[2,3]{1,0}, pred[5])") == 2 * 6 + 5


def test_topology_names_are_checked():
    assert chip_for("v5e:16x16").hbm_bytes == 16 * 2**30 and chip_for("V5P:2x2x1").generation == "v5p"
    with pytest.raises(ValueError, match="Unknown TPU topology 'v9:2x2'.*v5e:2x2"):
        chip_for("v9:2x2")
    with pytest.raises(ValueError, match="GENERATION:SHAPE"):
        chip_for("v5e")


def test_abstract_encoders_match_the_loaded_ones_and_know_the_paper_ones():
    """Shapes only, yet the same parameter tree and conditioning shapes as the builtin encoders; the paper's
    T5-XXL encoder and CLIP-L text tower come out at their published sizes (4.76B and 124M parameters)."""
    from ediff_jax.config_utils import base_config, use_paper_text_encoders
    from ediff_jax.plan.encoders import abstract_text_encoders
    from ediff_jax.text.conditioning import load_text_encoders

    text = base_config().text
    real, abstract = load_text_encoders(text), abstract_text_encoders(text)
    shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)
    assert shapes(abstract.params) == shapes(real.params)
    tokens = real.tokenize(["a red circle"])
    assert shapes(jax.eval_shape(abstract.encode, abstract.params, abstract.tokenize(["x"]))) == \
        shapes(jax.eval_shape(real.encode, real.params, tokens))
    paper = base_config()
    use_paper_text_encoders(paper)
    big = abstract_text_encoders(paper.text)
    count = {k: sum(math.prod(x.shape) for x in jax.tree.leaves(v)) for k, v in big.params.items()}
    assert round(count["t5"] / 1e9, 2) == 4.76 and round(count["clip"] / 1e6) == 124
    paper.text.t5_path = "~/models/my-own-t5"
    with pytest.raises(ValueError, match="not a local directory and not one of the paper's encoders"):
        abstract_text_encoders(paper.text)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs the TPU compiler: pip install -e .[tpu]")
def test_tiny_config_compiles_for_v5e_2x2(tmp_path):
    """The CLI end to end on the tiny config: it fits, parameter bytes per chip equal the parameter count x 4
    bytes (replicated on a pure data-parallel mesh), FLOPs per image are positive and data parallelism shows
    up as all-reduces (gradient averaging)."""
    out = tmp_path / "plan.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-m", "ediff_jax.plan", "--config", "configs/base64.py:size=tiny",
                             "--config.train.batch_size=8", "--topology", "v5e:2x2", f"--out={out}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fits" in result.stdout and "TFLOP per image" in result.stdout
    import json

    plan = json.loads(out.read_text())
    assert plan["chips"] == 4 and plan["mesh"] == {"data": 4} and plan["memory"]["fits"]
    from ediff_jax.config_utils import load_config
    from ediff_jax.training import build_experiment, state_shardings

    config = load_config(str(REPO / "configs/base64.py:size=tiny"))
    config.train.batch_size = 8
    abstract, _ = state_shardings(build_experiment(config, devices=jax.devices()[:1]))
    param_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(abstract.params))
    assert plan["memory"]["parts_per_chip"]["params"] == param_bytes
    assert plan["compute"]["flops_per_image"] > 0
    assert plan["communication"]["per_kind"]["all-reduce"]["count"] > 0
    assert np.isclose(plan["compute"]["images_per_s_per_chip"]["40%"],
                      0.4 * plan["compute"]["peak_flops_per_chip"] / plan["compute"]["flops_per_image"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs the TPU compiler: pip install -e .[tpu]")
def test_text_encoding_plans_split_the_encoders_over_fsdp(tmp_path):
    """`--encode` on the tiny config's encoders, v5e:2x2 as fsdp=4 (every divisible weight split): replicated,
    each chip holds every parameter (count x 4 bytes) and no collective is needed; sharded, each chip holds
    between a quarter and all of them, the compiler's own argument bytes hold those parameters plus the chip's
    quarter of the 8 captions' tokens (at least: TPU tiles pad small arrays), fewer than replicated, and the
    weights are all-gathered. FLOPs per caption agree with the CPU
    compile of the same `encode` (`ediff_jax.flops`), and neither layout changes them."""
    import json

    from ediff_jax import flops
    from ediff_jax.config_utils import load_config
    from ediff_jax.text.conditioning import load_text_encoders

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("XLA_FLAGS", None)
    plans = {}
    for layout in ("sharded", "replicated"):
        out = tmp_path / f"{layout}.json"
        result = subprocess.run([sys.executable, "-m", "ediff_jax.plan", "--config", "configs/base64.py:size=tiny",
                                 "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.sharding.fsdp_min_size=0",
                                 "--topology", "v5e:2x2", f"--encode={layout}", f"--out={out}"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Captions/s per pod" in result.stdout
        plans[layout] = json.loads(out.read_text())
    encoders = load_text_encoders(load_config(str(REPO / "configs/base64.py:size=tiny")).text)
    tokens = encoders.tokenize([""] * 8)
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(encoders.params))
    token_bytes_per_chip = sum(v.size * v.dtype.itemsize for v in tokens.values()) // 4
    sharded, replicated = plans["sharded"], plans["replicated"]
    assert replicated["params_per_chip_bytes"] == param_bytes and replicated["parameters"] * 4 == param_bytes
    assert param_bytes / 4 <= sharded["params_per_chip_bytes"] < param_bytes
    # The compiler's own argument bytes (TPU tiles pad small arrays, so at least the logical bytes) see the split.
    assert sharded["memory"]["argument_bytes"] >= sharded["params_per_chip_bytes"] + token_bytes_per_chip
    assert replicated["memory"]["argument_bytes"] >= param_bytes + token_bytes_per_chip
    assert sharded["memory"]["argument_bytes"] < replicated["memory"]["argument_bytes"]
    assert sharded["communication"]["per_kind"]["all-gather"]["count"] > 0
    assert all(v["count"] == 0 for v in replicated["communication"]["per_kind"].values())
    cpu = flops.compiled_flops(jax.jit(encoders.encode), encoders.params, tokens) / 8
    for plan in plans.values():
        assert plan["memory"]["fits"] and plan["captions_per_call"] == 8
        np.testing.assert_allclose(plan["compute"]["flops_per_caption"], cpu, rtol=0.1)


# --- --sweep -----------------------------------------------------------------------------------------


def _fake_plan(global_batch: int, compute_s: float, comm_s: float | None, total_bytes: int = 1,
               hbm_bytes: int = 2**30) -> dict:
    """The parts of a plan that the sweep reads."""
    return {"global_batch": global_batch, "compute": {"step_seconds": {"100%": compute_s * 0.4, "40%": compute_s}},
            "communication": {"seconds": comm_s,
                              "compute_bound_at_40%": None if comm_s is None else comm_s < compute_s},
            "memory": {"fits": total_bytes <= hbm_bytes, "compiled_total_bytes": total_bytes, "hbm_bytes": hbm_bytes,
                       "temp_bytes": 0}}


def test_sweep_candidates_and_flag_parsing():
    """Every data x fsdp factorisation; an expert axis only where it divides the experts; flags parsed or
    refused with the fix."""
    from ediff_jax.plan import sweep

    assert sweep.mesh_shapes(4, 1) == [{"data": 4, "fsdp": 1, "expert": 1}, {"data": 2, "fsdp": 2, "expert": 1},
                                       {"data": 1, "fsdp": 4, "expert": 1}]
    with_experts = sweep.mesh_shapes(4, 2)
    assert len(with_experts) == 5 and {"data": 1, "fsdp": 2, "expert": 2} in with_experts
    assert all(m["expert"] == 1 for m in sweep.mesh_shapes(4, 3))  # 3 experts cannot split over 2 or 4 chips
    assert sweep.parse_batches("8, 2,8") == [2, 8] and sweep.parse_remat("on") == [True]
    assert sweep.parse_meshes("data=4;data=2,fsdp=2") == [{"data": 4}, {"data": 2, "fsdp": 2}]
    for parse, text, match in [(sweep.parse_batches, "0,4", "positive integers"),
                               (sweep.parse_batches, "", "positive integers"),
                               (sweep.parse_remat, "yes", "off, on or off,on"),
                               (sweep.parse_meshes, "data=4;tensor=2", "'tensor=2' is not AXIS=SIZE"),
                               (sweep.parse_meshes, "data=2,data=2", "each once per mesh")]:
        with pytest.raises(ValueError, match=match):
            parse(text)
    with pytest.raises(ValueError, match="uses 2 devices but v5e:2x2 has 4"):
        sweep.check_meshes([{"data": 2}], 4, 1, "v5e:2x2")
    with pytest.raises(ValueError, match="expert=2 does not divide the config's 3"):
        sweep.check_meshes([{"data": 2, "expert": 2}], 4, 3, "v5e:2x2")
    assert sweep.config_overrides(["x", "--config", "c.py", "--config.mesh.fsdp=2", "--noconfig.model.remat"]) == \
        ["config.mesh.fsdp", "config.model.remat"]
    with pytest.raises(ValueError, match="restrict the sweep with --sweep_meshes"):
        sweep.check_overrides(["config.mesh.fsdp"], batches_given=False)
    with pytest.raises(ValueError, match="drop one of the two"):
        sweep.check_overrides(["config.train.batch_size"], batches_given=True)
    sweep.check_overrides(["config.train.batch_size", "config.train.lr"], batches_given=False)


def test_sweep_prediction_is_the_slower_of_compute_and_collectives():
    from ediff_jax.plan import sweep

    assert sweep.predicted_images_per_s(64, compute_s=0.5, comm_s=0.1) == 128  # compute-bound
    assert sweep.predicted_images_per_s(64, compute_s=0.5, comm_s=2.0) == 32  # communication-bound
    assert sweep.predicted_images_per_s(64, compute_s=0.5, comm_s=None) == 128  # no ICI figure
    assert sweep.predict(_fake_plan(64, 0.5, 2.0)) == (32, "communication")
    assert sweep.predict(_fake_plan(64, 0.5, 0.1)) == (128, "compute")


def test_sweep_ranks_what_fits_and_records_what_does_not():
    """With a stand-in planner: rows that fit come first by predicted images/s, the best is the first; a
    compiler refusal and a config refusal become rows with their reason, and a larger batch of a mesh and
    remat setting that already ran out of HBM is not compiled."""
    from ediff_jax.config_utils import load_config
    from ediff_jax.plan import sweep

    class NoHBM(Exception):
        pass

    calls = []

    def plan(config, topology):
        mesh, b = config.mesh, config.train.batch_size
        calls.append((mesh.data, mesh.fsdp, config.model.remat, b))
        if mesh.fsdp == 4:
            raise ValueError("config.train.batch_size=8 is not divisible by the 4 data-parallel devices.")
        if b // 4 * (1 if config.model.remat else 3) > 12:
            raise NoHBM("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.")
        # a fixed cost per step that larger batches amortise; remat recomputes; fsdp adds collectives
        compute_s = (b * 1e-3 + 2e-3) * (1.3 if config.model.remat else 1.0) * (1.1 if mesh.fsdp else 1.0)
        return _fake_plan(b, compute_s=compute_s, comm_s=(12e-3 if mesh.fsdp else 4e-3))

    config = load_config(str(REPO / "configs/base64.py:size=tiny"))
    meshes = [{"data": 4}, {"data": 2, "fsdp": 2}, {"data": 1, "fsdp": 4}]
    cands = sweep.candidates(meshes, [False, True], [2, 4, 8])
    rows = sweep.plan_all(config, "v5e:2x2", cands, 4, plan, NoHBM)
    assert len(rows) == len(cands) == 18 and len(calls) == 18
    fit = [r for r in rows if r["fits"]]
    assert rows[:len(fit)] == fit and len(fit) == 10  # remat off fits 2 and 4 per chip, on also 8; not fsdp=4
    rates = [r["images_per_s_pod"] for r in fit]
    assert rates == sorted(rates, reverse=True)
    assert all(r["images_per_s_pod"] == sweep.predicted_images_per_s(
        r["global_batch"], r["plan"]["compute"]["step_seconds"]["40%"], r["plan"]["communication"]["seconds"])
        for r in fit)
    assert sweep.best(rows) is rows[0]
    assert (rows[0]["mesh"], rows[0]["remat"], rows[0]["per_chip_batch"]) == ({"data": 4}, False, 4)
    status = {(sweep._mesh_text(r["mesh"]), r["remat"], r["per_chip_batch"]): r for r in rows}
    assert status["data=4", False, 8]["status"] == sweep.NO_HBM and "RESOURCE_EXHAUSTED" in status[
        "data=4", False, 8]["reason"]
    assert status["data=1 fsdp=4", True, 2]["status"] == sweep.REFUSED and "not divisible" in status[
        "data=1 fsdp=4", True, 2]["reason"]
    assert status["data=2 fsdp=2", False, 2]["bound"] == "communication"
    calls.clear()
    rows = sweep.plan_all(config, "v5e:2x2", sweep.candidates(meshes[:1], [False], [4, 8, 16]), 4, plan, NoHBM)
    assert [r["status"] for r in rows] == [sweep.FITS, sweep.NO_HBM, sweep.SKIPPED] and len(calls) == 2
    text = sweep.format_sweep(rows, "v5e:2x2")
    assert "ran out of HBM" in text and text.splitlines()[-1].startswith("best: mesh data=4, remat off, 4 per chip")


def test_sweep_flags_are_checked_on_the_command_line():
    """Sweep flags without --sweep, and a bad --sweep_batches: one `error:` line each, no traceback, before
    any compile."""
    for args, message in [(["--sweep_batches=4"], "error: --sweep_batches only applies to a sweep: add --sweep"),
                          (["--sweep", "--sweep_batches=4,x"], "error: --sweep_batches='4,x': give per-chip batches"),
                          (["--sweep", "--encode=sharded"], "error: --encode plans the text encoders and --sweep the "
                                                            "train step: give one of them.")]:
        result = subprocess.run([sys.executable, "-m", "ediff_jax.plan", "--config", "configs/base64.py:size=tiny",
                                 "--topology", "v5e:2x2", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.startswith(message), result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs the TPU compiler: pip install -e .[tpu]")
def test_sweep_of_the_tiny_config_on_v5e_2x2(tmp_path):
    """The CLI's --sweep end to end, at 16x16 pixels (the same program as at 32, quicker to compile): one mesh,
    remat off and on, 1 per chip (fits) and 65,536 per chip (the TPU compiler refuses it for HBM; the larger
    batch after it is not compiled). What fits is ranked by predicted throughput, the best is the first and
    the last line; each prediction is the plan's own 40%-MFU pod ceiling, slowed down only where the plan's
    collective time exceeds its compute time; remat recomputes the forward pass, so its FLOPs per image are
    higher at the same mesh and batch."""
    import json

    out = tmp_path / "sweep.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-m", "ediff_jax.plan", "--config", "configs/base64.py:size=tiny",
                             "--config.data.image_size=16", "--topology", "v5e:2x2", "--sweep",
                             "--sweep_meshes=data=4", "--sweep_batches=1,65536,131072", f"--out={out}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    sweep = json.loads(out.read_text())
    rows = sweep["rows"]
    assert len(rows) == 6 and sweep["best"] == rows[0]
    fit = [r for r in rows if r["fits"]]
    assert rows[:2] == fit and [(r["per_chip_batch"], r["global_batch"]) for r in fit] == [(1, 4), (1, 4)]
    assert fit[0]["images_per_s_pod"] >= fit[1]["images_per_s_pod"]
    for r in fit:
        p = r["plan"]
        assert p["mesh"] == {"data": 4} and p["global_batch"] == 4 and p["memory"]["fits"]
        compute, comm = p["compute"]["step_seconds"]["40%"], p["communication"]["seconds"]
        assert np.isclose(r["images_per_s_pod"], 4 / max(compute, comm))
        assert np.isclose(r["images_per_s_pod"], p["compute"]["images_per_s_pod"]["40%"] * min(1.0, compute / comm))
    by_remat = {r["remat"]: r["plan"] for r in fit}
    assert by_remat[True]["compute"]["flops_per_image"] > by_remat[False]["compute"]["flops_per_image"]
    misfit = {(r["remat"], r["per_chip_batch"]): r for r in rows[2:]}
    for remat in (False, True):
        assert "RESOURCE_EXHAUSTED" in misfit[remat, 65536]["reason"] and misfit[remat, 65536]["plan"] is None
        assert misfit[remat, 131072]["reason"] == "not compiled: 65536 per chip already runs out of HBM"
    lines = result.stdout.strip().splitlines()
    best = sweep["best"]
    assert lines[-1] == f"Wrote {out}." and lines[-2].startswith(
        f"best: mesh data=4, remat {'on' if best['remat'] else 'off'}, 1 per chip (global batch 4)")


@pytest.mark.parametrize("stage, image, lowres", [("256", 32, 16), ("1024", 32, 16)])
def test_sr_stage_plans_a_batch_of_crops_and_their_low_res_input(stage, image, lowres):
    """An SR stage is planned on what its training loop feeds: the 1024 stage on random crops (tiny: 32 of its 64,
    low-res input 32 x 32/64 = 16), not whole images; the 256 stage on whole 32s from 16s; text as cached
    embeddings when `data.text_cache` is on; every array split over the batch axis. No compile, no libtpu."""
    from ediff_jax.config_utils import load_config
    from ediff_jax.plan.compile import abstract_batch
    from ediff_jax.plan.encoders import abstract_text_encoders
    from ediff_jax.training import build_experiment

    config = load_config(str(REPO / f"configs/sr.py:stage={stage},size=tiny"))
    config.data.text_cache = True
    exp = build_experiment(config, devices=jax.devices(), encoders=abstract_text_encoders(config.text))
    batch = abstract_batch(exp)
    b = int(config.train.batch_size)
    assert batch["image"].shape == (b, image, image, 3) and batch["lowres"].shape == (b, lowres, lowres, 3)
    assert {"t5", "t5_mask", "clip", "clip_mask", "clip_pooled"} <= set(batch)
    assert all(v.shape[0] == b and v.sharding.spec[0] is not None for v in batch.values())
