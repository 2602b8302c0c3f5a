"""`python -m ediff_jax.sample`: the flags build one `GenerationSpec`; every flag reaches it or is refused.

`generation.generate` is replaced by a recorder, so these tests check the wiring alone (no model is
loaded): a flag that is given and then dropped on its way to the pipeline would otherwise change
nothing and say nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from ediff_jax import generation, sample
from ediff_jax.spec import CanvasSpec, GenerationSpec, PaintSpec, SRStage, StageSettings

BASE = ["sample", "--workdir=W", "--prompt=a red circle", "--out=O"]
# Every flag at a valid value that is not its default.
VALUES = {
    "num": "--num=2", "guidance": "--guidance=3.5", "steps": "--steps=7", "seed": "--seed=5",
    "sampler": "--sampler=euler", "ema_decay": "--ema_decay=0.9995", "ema_sigma_rel": "--ema_sigma_rel=0.1",
    "use_t5": "--nouse_t5", "use_clip": "--nouse_clip", "prompt": "--prompt=a blue square", "workdir": "--workdir=V",
    "out": "--out=P", "paint": "--paint=red circle=m.png", "pww_weight": "--pww_weight=1.5", "height": "--height=32",
    "width": "--width=64", "stride": "--stride=8", "circular": "--circular", "region": "--region=a cat=r.png",
    "chunk_size": "--chunk_size=2", "bootstrap": "--bootstrap=0.5", "sr_workdir": "--sr_workdir=S",
    "sr_steps": "--sr_steps=3", "sr_guidance": "--sr_guidance=1.5", "aug_level": "--aug_level=0.2",
    "sr_seed": "--sr_seed=9", "sr_mode": "--sr_mode=tiles", "canvas_strategy": "--canvas_strategy=shifted",
    "coherence": "--coherence=2", "coherence_steps": "--coherence_steps=4",
}
# Commands each flag is tried on: plain, painted, a panorama with a region, a cascade, a cascade of a panorama.
CONTEXTS = {
    "plain": [], "paint": ["--paint=blue square=b.png"], "canvas": ["--width=96", "--region=a dog=d.png"],
    "cascade": ["--sr_workdir=S2"], "cascade_canvas": ["--sr_workdir=S2", "--width=96"],
}


@pytest.fixture
def calls(monkeypatch):
    """Records each `generate(spec, out=...)` call instead of sampling."""
    recorded = []

    def record(spec, out=None, progress=True):
        recorded.append((spec, out))
        return [np.zeros((1, 32, 32, 3), np.uint8)]

    monkeypatch.setattr(generation, "generate", record)
    yield recorded
    sample.FLAGS.unparse_flags()


def parse(argv: list[str]) -> GenerationSpec:
    sample.FLAGS.unparse_flags()
    sample.parse_flags(BASE + argv)
    sample.check_flags()
    return sample.spec_from_flags()


def run(argv: list[str]) -> None:
    parse(argv)
    sample.run()


def test_every_flag_of_the_cli_is_tried():
    """A new flag must be listed here, or the reach-or-refuse test below cannot see it."""
    defined = {f.name for f in sample.FLAGS.get_flags_for_module(sample.__name__)}
    assert defined == set(VALUES)


CASES = [(ctx, flag) for ctx in CONTEXTS for flag in VALUES if flag not in ("out",)]


@pytest.mark.parametrize("context, flag", CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_every_flag_reaches_the_spec_or_is_refused(calls, context, flag):
    """Given on top of any command, a flag either changes the spec or is refused in one line that names it."""
    without = parse(CONTEXTS[context])
    try:
        with_flag = parse(CONTEXTS[context] + [VALUES[flag]])
    except ValueError as e:
        assert f"--{flag}" in str(e) and "\n" not in str(e), str(e)
        return
    assert with_flag != without


def test_out_reaches_generate(calls):
    run(["--width=64"])
    run(["--sr_workdir=S"])
    assert [out for _, out in calls] == ["O", "O"]


def test_flags_fill_the_spec(calls):
    spec = parse(["--num=2", "--guidance=3.5", "--steps=7", "--seed=5", "--sampler=euler", "--ema_decay=0.9995",
                  "--nouse_t5", "--paint=red circle=m.png", "--pww_weight=1.5", "--height=32", "--width=64",
                  "--stride=8", "--circular", "--region=a cat=r.png", "--chunk_size=2", "--bootstrap=0.5",
                  "--sr_workdir=S", "--sr_workdir=T", "--sr_steps=3", "--sr_steps=4", "--sr_guidance=1.5",
                  "--sr_guidance=2", "--aug_level=0.2", "--aug_level=0", "--sr_seed=9", "--sr_seed=8",
                  "--sr_mode=tiles"])
    assert spec == GenerationSpec(
        workdir="W", prompts=("a red circle",), num=2, seed=5,
        base=StageSettings(steps=7, guidance=3.5, sampler="euler"),
        canvas=CanvasSpec(height=32, width=64, stride=8, circular=True, chunk_size=2,
                          regions=(("a cat", "r.png"),), bootstrap_fraction=0.5),
        paint=PaintSpec({"red circle": "m.png"}, 1.5),
        sr_stages=(SRStage("S", StageSettings(steps=3, guidance=1.5, aug_level=0.2, seed=9, sampler="euler")),
                   SRStage("T", StageSettings(steps=4, guidance=2.0, aug_level=0.0, seed=8, sampler="euler"))),
        sr_mode="tiles", ema_decay=0.9995, use_t5=False)


def test_guidance_once_per_expert():
    """`--guidance` repeated gives one scale per expert, highest noise first."""
    assert parse(["--guidance=5", "--guidance=2"]).base.guidance == (5.0, 2.0)
    assert parse(["--guidance=3"]).base.guidance == 3.0


@pytest.mark.parametrize("argv, message", [
    (["--height=32", "--bootstrap=0.5"], "--bootstrap acts on --region prompts only"),
    (["--pww_weight=1.5"], "--pww_weight is the strength of --paint"),
    (["--sr_workdir=S", "--pww_weight=1.5"], "--pww_weight is the strength of --paint"),
    (["--sr_workdir=S", "--stride=8"], "--stride sets up MultiDiffusion crops, and nothing here samples crops"),
    (["--sr_workdir=S", "--chunk_size=2"], "--chunk_size sets up MultiDiffusion crops"),
    (["--stride=8"], "--stride sets up MultiDiffusion crops"),
    (["--canvas_strategy=gaussian"], "--canvas_strategy sets up MultiDiffusion crops"),
    (["--width=64", "--canvas_strategy=shifted", "--stride=8"], "shifted strategy's windows do not overlap"),
    (["--coherence=2"], "--coherence pulls a panorama's crops together, and nothing here is a canvas"),
    (["--width=64", "--coherence_steps=4"], "--coherence_steps counts the steps of coherence guidance"),
    (["--width=64", "--coherence=-1"], "--coherence=-1.0: the coherence guidance weight is a finite number >= 0"),
    (["--sr_steps=3"], "--sr_steps was given 1 times but there are 0 --sr_workdir stages"),
    (["--sr_mode=tiles"], "--sr_mode tiles sets how SR stages run, and there are none"),
    (["--aug_level=0.1"], "--aug_level was given 1 times"),
    (["--ema_decay=0.999", "--ema_sigma_rel=0.1"], "--ema_decay and --ema_sigma_rel both pick the EMA"),
])
def test_a_flag_with_nothing_to_act_on_is_refused(calls, argv, message):
    """Refused before anything is loaded, with the fix."""
    with pytest.raises(ValueError, match=message):
        run(argv)
    assert calls == []


def test_explicit_defaults_and_the_combinations_that_read_them_pass(calls):
    """`--nocircular`, `--sr_mode=full` or `--bootstrap=0.2` change nothing and are not refused; --sr_mode tiles
    reads --stride and --chunk_size without a panorama."""
    assert parse(["--nocircular", "--sr_mode=full", "--bootstrap=0.2"]) == parse([])
    spec = parse(["--sr_workdir=S", "--sr_mode=tiles", "--stride=8", "--chunk_size=2"])
    assert (spec.canvas.stride, spec.canvas.chunk_size, spec.canvas.places_canvas) == (8, 2, False)


def test_the_sampler_is_checked_against_the_workdirs_steps_before_loading(tmp_path):
    """`--sampler dpmpp_2m` without --steps takes the config's steps (was: checked as 1 step and refused);
    a config whose steps are too few for it is refused before any checkpoint is read."""
    from ediff_jax.config_utils import base_config
    from ediff_jax.spec import CanvasSpec

    config = base_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(FileNotFoundError, match="No checkpoint"):  # past the sampler check, at the load
        generation.sample_from_workdir(tmp_path, ["a red circle"], sampler="dpmpp_2m", out=tmp_path / "o")
    config.sample.steps = 2
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(ValueError, match="needs at least 3 steps"):
        generation.sample_from_workdir(tmp_path, ["a red circle"], sampler="dpmpp_2m", out=tmp_path / "o")
    with pytest.raises(ValueError, match="guidance has 2 values but a single model samples this stage"):
        generation.sample_from_workdir(tmp_path, ["a red circle"], guidance=(3.0, 2.0), out=tmp_path / "g")
    assert not (tmp_path / "g").exists()  # refused before the output folder is made
    with pytest.raises(ValueError, match="coherence steps=5 must be a whole number from 1 to the sampler's 2 steps"):
        generation.sample_from_workdir(tmp_path, ["a red circle"], out=tmp_path / "c",
                                       canvas=CanvasSpec(width=64, coherence=1.0, coherence_steps=5))
    assert not (tmp_path / "c").exists()


def test_the_specs_names_are_the_libraries():
    """spec.py names the samplers without importing JAX; they must be edm's."""
    from ediff_jax import edm, spec

    assert set(spec.SAMPLERS) == set(edm.SAMPLERS)
