"""`python -m ediff_jax.sample`: every flag reaches the mode it is for, or is refused.

The entry points of the four modes are replaced by recorders, so these tests check the
wiring alone (no model is loaded): a flag that is given and then dropped on its way to
the sampler would otherwise change nothing and say nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from ediff_jax import cascade, generation, multidiffusion, paint_with_words, sample

BASE = ["sample", "--workdir=W", "--prompt=a red circle", "--out=O"]
# Every common flag at a value that is not its default.
COMMON = ["--num=2", "--guidance=3.5", "--steps=7", "--seed=5", "--sampler=euler", "--ema_decay=0.9995",
          "--ema_sigma_rel=0.1", "--nouse_t5", "--nouse_clip"]
# One valid, non-default value per mode flag.
VALUES = {
    "paint": "--paint=red circle=m.png", "pww_weight": "--pww_weight=1.5", "height": "--height=32",
    "width": "--width=64", "stride": "--stride=8", "circular": "--circular", "region": "--region=a cat=r.png",
    "chunk_size": "--chunk_size=2", "bootstrap": "--bootstrap=0.5", "sr_workdir": "--sr_workdir=S",
    "sr_steps": "--sr_steps=3", "sr_guidance": "--sr_guidance=1.5", "aug_level": "--aug_level=0.2",
    "sr_seed": "--sr_seed=9", "sr_mode": "--sr_mode=tiles",
}
# Flags that choose the mode themselves (giving one changes the mode instead of being refused).
SWITCHES = {"paint", "height", "width", "region", "circular", "sr_workdir"}


@pytest.fixture
def calls(monkeypatch):
    """Records each mode's entry-point call instead of sampling."""
    recorded = []

    def recorder(name):
        def record(*args, **kwargs):
            recorded.append((name, args, kwargs))
            return [np.zeros((1, 32, 32, 3), np.uint8)] if name == "cascade" else []
        return record

    monkeypatch.setattr(generation, "sample_from_workdir", recorder("image"))
    monkeypatch.setattr(paint_with_words, "sample_with_paint", recorder("paint"))
    monkeypatch.setattr(multidiffusion, "sample_canvas_from_workdir", recorder("canvas"))
    monkeypatch.setattr(cascade, "sample_cascade_from_workdirs", recorder("cascade"))
    yield recorded
    sample.FLAGS.unparse_flags()


def run(argv: list[str]) -> None:
    sample.FLAGS.unparse_flags()
    sample.parse_flags(BASE + argv)
    sample.check_flags()
    sample.run()


def test_every_flag_of_the_cli_is_assigned_to_modes():
    """A new flag must be listed as common or as some mode's, or the refusal check cannot see it."""
    defined = {f.name for f in sample.FLAGS.get_flags_for_module(sample.__name__)}
    assert defined == set(sample.SAMPLE_FLAGS)
    assert set(VALUES) == set(sample.SAMPLE_FLAGS) - set(sample.COMMON_FLAGS)


COMMON_KWARGS = {"guidance": 3.5, "steps": 7, "seed": 5, "sampler": "euler", "out": "O", "ema_decay": 0.9995,
                 "ema_sigma_rel": 0.1, "use_t5": False, "use_clip": False, "num": 2}


@pytest.mark.parametrize("mode, argv, expected", [
    ("image", [], {}),
    ("paint", ["--paint=red circle=m.png", "--pww_weight=1.5"], {"weight": 1.5}),
    ("canvas", ["--height=32", "--width=64", "--stride=8", "--circular", "--region=a cat=r.png",
                "--chunk_size=2", "--bootstrap=0.5"],
     {"height": 32, "width": 64, "stride": 8, "circular": True, "regions": [("a cat", "r.png")], "chunk_size": 2,
      "bootstrap_fraction": 0.5, "paint": None}),
    # paint-with-words on a canvas (issue #17): the painting and its weight reach the canvas sampler
    ("canvas", ["--width=64", "--region=a cat=r.png", "--paint=red circle=m.png", "--pww_weight=1.5"],
     {"width": 64, "regions": [("a cat", "r.png")], "paint": {"red circle": "m.png"}, "pww_weight": 1.5}),
])
def test_common_and_mode_flags_reach_the_sampler(calls, mode, argv, expected):
    run(COMMON + argv)
    [(name, args, kwargs)] = calls
    assert name == mode
    assert args[:2] == ("W", ["a red circle"])
    for key, value in {**COMMON_KWARGS, **expected}.items():
        assert kwargs[key] == value, key
    if mode == "paint":
        assert args[2] == {"red circle": "m.png"}


def test_cascade_flags_reach_every_stage(calls):
    """The base stage takes the common flags; ema_decay and the encoder choice reach the cascade."""
    run(COMMON + ["--sr_workdir=S", "--sr_steps=3", "--sr_guidance=1.5", "--aug_level=0.2", "--sr_seed=9",
                  "--sr_mode=tiles", "--height=32", "--width=64", "--stride=8", "--circular", "--chunk_size=2",
                  "--region=a cat=r.png", "--bootstrap=0.5", "--paint=red circle=m.png", "--pww_weight=1.5"])
    [(name, args, kwargs)] = calls
    assert name == "cascade" and args[:3] == ("W", ["S"], ["a red circle"])
    base, sr = args[3]
    assert (base.steps, base.guidance, base.seed, base.sampler) == (7, 3.5, 5, "euler")
    assert (sr.steps, sr.guidance, sr.aug_level, sr.seed, sr.sampler) == (3, 1.5, 0.2, 9, "euler")
    assert {k: kwargs[k] for k in ("num", "out", "ema_decay", "ema_sigma_rel", "use_t5", "use_clip", "height",
                                   "width", "stride", "circular", "sr_mode", "chunk_size", "seed")} == {
        "num": 2, "out": "O", "ema_decay": 0.9995, "ema_sigma_rel": 0.1, "use_t5": False, "use_clip": False,
        "height": 32, "width": 64,
        "stride": 8, "circular": True, "sr_mode": "tiles", "chunk_size": 2, "seed": 5}
    # a region-prompted, painted panorama through the cascade (issue #17)
    assert (kwargs["regions"], kwargs["paint"], kwargs["pww_weight"], kwargs["bootstrap_fraction"]) == (
        [("a cat", "r.png")], {"red circle": "m.png"}, 1.5, 0.5)


MODE_ARGV = {"image": [], "paint": [VALUES["paint"]], "canvas": [VALUES["height"]], "cascade": [VALUES["sr_workdir"]]}
UNREAD = [(mode, flag) for mode in sample.MODE_FLAGS for flag in VALUES
          if flag not in sample.MODE_FLAGS[mode] and flag not in SWITCHES]


@pytest.mark.parametrize("mode, flag", UNREAD, ids=[f"{m}-{f}" for m, f in UNREAD])
def test_a_flag_the_mode_does_not_read_is_refused(calls, mode, flag):
    """Refused in one line that names the flag, before anything is loaded."""
    with pytest.raises(ValueError, match=f"--{flag} is for ") as e:
        run(MODE_ARGV[mode] + [VALUES[flag]])
    assert "\n" not in str(e.value)
    assert calls == []


@pytest.mark.parametrize("argv, message", [
    (["--height=32", "--bootstrap=0.5"], "--bootstrap acts on --region prompts only"),
    (["--height=32", "--pww_weight=1.5"], "--pww_weight is the strength of --paint"),
    (["--sr_workdir=S", "--bootstrap=0.5"], "--bootstrap acts on --region prompts only"),
    (["--sr_workdir=S", "--pww_weight=1.5"], "--pww_weight is the strength of --paint"),
    (["--sr_workdir=S", "--stride=8"], "--stride sets up MultiDiffusion crops, and this cascade samples none"),
    (["--sr_workdir=S", "--circular"], "--circular sets up MultiDiffusion crops"),
    (["--sr_workdir=S", "--chunk_size=2"], "--chunk_size sets up MultiDiffusion crops"),
])
def test_a_flag_read_only_in_other_combinations_is_refused(calls, argv, message):
    """Read by the mode, but not with these other flags (no region to bootstrap, no canvas in the cascade)."""
    with pytest.raises(ValueError, match=message):
        run(argv)
    assert calls == []


def test_explicit_defaults_and_the_combinations_that_read_them_pass(calls):
    """`--nocircular` or `--sr_mode=full` in plain sampling change nothing and are not refused; --sr_mode tiles
    reads --stride and --chunk_size without a panorama."""
    run(["--nocircular", "--sr_mode=full", "--bootstrap=0.2"])
    run(["--sr_workdir=S", "--sr_mode=tiles", "--stride=8", "--chunk_size=2"])
    assert [name for name, _, _ in calls] == ["image", "cascade"]
    assert calls[1][2]["stride"] == 8 and calls[1][2]["chunk_size"] == 2


def test_the_sampler_is_checked_against_the_workdirs_steps_before_loading(tmp_path):
    """`--sampler dpmpp_2m` without --steps takes the config's steps (was: checked as 1 step and refused);
    a config whose steps are too few for it is refused before any checkpoint is read."""
    from ediff_jax.config_utils import base_config

    config = base_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(FileNotFoundError, match="No checkpoint"):  # past the sampler check, at the load
        generation.sample_from_workdir(tmp_path, ["a red circle"], sampler="dpmpp_2m", out=tmp_path / "o")
    config.sample.steps = 2
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(ValueError, match="needs at least 3 steps"):
        generation.sample_from_workdir(tmp_path, ["a red circle"], sampler="dpmpp_2m", out=tmp_path / "o")
