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
    assert chip_for("v5e:16x16").hbm_bytes == 16 * 10**9 and chip_for("V5P:2x2x1").generation == "v5p"
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
