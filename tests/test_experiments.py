"""The ablation scripts (experiments/ablations) end to end in --smoke mode, and their helpers.

One tiny model is trained once for the module (the smoke config: one UNet level, 3 steps)
and every sampling ablation evaluates it in-process through its `main(argv)`; the experts
ablation trains its 2- and 3-expert runs itself, reusing that model as the 1-expert run.
Training and compiling the model alone take minutes on the 2-core CPU, so every test that
needs it is slow-marked; the helpers' unit tests below run in the default selection.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import layout_probe, pww_figure, shapes_benchmark
from experiments.ablations import canvas, common, encoders, experts, guidance, posthoc_ema, pww_weight, stride

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_workdir(shapes_data_dir, tmp_path_factory) -> Path:
    """The smoke model (what `--smoke` trains without --workdir), trained once for this module."""
    config = common.ablation_config(experts=1, steps=common.SMOKE_TRAIN_STEPS, batch=common.smoke_batch(), smoke=True,
                                    data_dir=shapes_data_dir)
    return common.train_or_reuse(config, tmp_path_factory.mktemp("ablations") / "smoke_workdir")


def check_outputs(out: Path, rows: list[dict], settings_column: str, expected: list, pngs: list[str]) -> list[dict]:
    """Shared checks: one CSV row per setting, in order; the Markdown table has as many rows; PNGs decode."""
    table = common.read_results(out)
    assert [type(expected[0])(r[settings_column]) for r in table] == expected
    assert len(rows) == len(expected)
    md = (out / "results.md").read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith(f"| {settings_column} |"))
    assert len([line for line in md[header + 2:] if line.startswith("|")]) == len(expected)
    for name in pngs:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 0
    return table


def main_at_default_optimisation(script: str, argv: list[str], tmp_path: Path) -> list[dict]:
    """`experiments.ablations.<script>.main(argv)` in a child process that compiles at XLA:CPU's default
    optimisation level; returns main's rows (through JSON: numbers stay numbers, NaN included).

    The suite compiles at level 0 (tests/conftest.py), which suits its compile-bound tests; a smoke run bound by
    executing its programs runs several times faster at the default level, the child's start-up included.
    JAX is imported before the script, so --smoke leaves the level alone (common.configure_smoke_runtime).
    """
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
    rows_json = tmp_path / f"{script}_rows.json"
    code = (f"import json, sys, jax\nfrom experiments.ablations import {script}\n"
            f"rows = {script}.main(sys.argv[2:])\nopen(sys.argv[1], 'w').write(json.dumps(rows, default=float))\n")
    result = subprocess.run([sys.executable, "-c", code, str(rows_json), *argv], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "XLA_FLAGS": " ".join(flags)})
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return json.loads(rows_json.read_text())


def assert_accuracy(value: float) -> None:
    assert math.isnan(value) or 0.0 <= value <= 1.0, value


def assert_distances(row: dict) -> None:
    assert np.isfinite(row["frechet_distance"]) and row["frechet_distance"] >= 0
    assert np.isfinite(row["kid"]) and row["kid_std"] >= 0


@pytest.mark.slow
def test_smoke_workdir_is_reused_not_retrained(smoke_workdir):
    """A finished run is recognised, so the scripts reuse workdirs instead of training again."""
    assert common.is_trained(smoke_workdir, common.SMOKE_TRAIN_STEPS)
    assert not common.is_trained(smoke_workdir, common.SMOKE_TRAIN_STEPS + 1)


@pytest.mark.slow
def test_encoders_smoke(smoke_workdir, tmp_path):
    """T5/CLIP/both: one row per setting with the right encoder flags, accuracies in [0, 1], finite distances."""
    rows = encoders.main(["--smoke", "--workdir", str(smoke_workdir), "--out", str(tmp_path)])
    check_outputs(tmp_path, rows, "encoders", ["both", "t5", "clip"], ["metrics.png", "samples.png"])
    assert [(r["use_t5"], r["use_clip"]) for r in rows] == [(True, True), (True, False), (False, True)]
    for row in rows:
        for column in common.ALIGNMENT_COLUMNS:
            assert_accuracy(row[column])
        assert_distances(row)
        assert row["num_prompts"] == 8


@pytest.mark.slow
def test_guidance_smoke(smoke_workdir, tmp_path):
    """Guidance sweep: one row per scale, the trade-off plot written, accuracies in [0, 1], finite distances."""
    rows = guidance.main(["--smoke", "--workdir", str(smoke_workdir), "--out", str(tmp_path)])
    check_outputs(tmp_path, rows, "guidance", [1.0, 3.0], ["tradeoff.png", "metrics.png", "samples.png"])
    for row in rows:
        assert_accuracy(row["all_ok_accuracy"])
        assert_distances(row)


@pytest.mark.slow
def test_posthoc_ema_smoke(shapes_data_dir, tmp_path):
    """Trains the smoke model with post-hoc snapshots, reconstructs two EMA widths and scores them beside
    the tracked EMA; a --workdir without snapshots is refused in one line naming the config to use."""
    from ediff_jax.workdirs import read_workdir_config

    rows = posthoc_ema.main(["--smoke", "--data_dir", shapes_data_dir, "--out", str(tmp_path / "out")])
    decay = float(read_workdir_config(tmp_path / "out" / "workdir").train.ema_decay)
    table = check_outputs(tmp_path / "out", rows, "ema", [f"tracked {decay:g}", "sigma_rel 0.05", "sigma_rel 0.2"],
                          ["metrics.png", "samples.png"])
    for row in table:
        assert_accuracy(float(row["all_ok_accuracy"]))
    for row in rows:
        assert_distances(row)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(common.ablation_config(smoke=True).to_json_best_effort())
    with pytest.raises(ValueError, match="needs post-hoc EMA snapshots"):
        posthoc_ema.main(["--smoke", "--workdir", str(plain), "--out", str(tmp_path / "refused")])


@pytest.mark.slow
def test_pww_weight_smoke(smoke_workdir, tmp_path):
    """Paint-with-words sweep: one row per w', rates in [0, 1], chance = the painted half of the image."""
    rows = pww_weight.main(["--smoke", "--workdir", str(smoke_workdir), "--out", str(tmp_path)])
    check_outputs(tmp_path, rows, "pww_weight", [0.0, 1.0], ["metrics.png", "samples.png"])
    for row in rows:
        assert row["images"] == 2 and row["objects"] == 4  # 2 layouts x 1 pair x 1 seed, two objects each
        for column in ("detection_rate", "placement_accuracy", "all_placed", "two_object_color_shape_accuracy"):
            assert_accuracy(row[column])
        assert row["chance"] == pytest.approx(0.5)  # left/right and top/bottom halves
        assert_distances(row)


@pytest.mark.slow
def test_stride_smoke(smoke_workdir, tmp_path):
    """Stride sweep: views and evaluations follow the tiling geometry, cost and seam ratio are positive."""
    rows = stride.main(["--smoke", "--workdir", str(smoke_workdir), "--out", str(tmp_path)])
    check_outputs(tmp_path, rows, "stride", [16, 32], ["metrics.png", "panoramas.png"])
    # 32x64 canvas, 32 window: stride 16 -> offsets 0, 16, 32; stride 32 -> 0, 32. Euler, 2 steps.
    assert [r["views"] for r in rows] == [3, 2]
    assert [r["evals_per_image"] for r in rows] == [6, 4]
    for row in rows:
        assert row["seconds_per_image"] > 0 and row["compile_seconds"] >= 0 and row["seam_ratio"] > 0
        assert_accuracy(row["crop_color_shape_accuracy"])
        assert_distances(row)


@pytest.mark.slow
def test_canvas_smoke(smoke_workdir, tmp_path):
    """Canvas strategies: a row per canvas x strategy; crops per call follow the geometry (32x128 at stride 8:
    13 overlapping views, 5 shifted windows; circular 32x256: 32 and 8), evaluations = crops x prompt rows x
    sampler evaluations (Euler, 2 steps), plus the anchor crop on the one guided evaluation of the coherence
    rows (half of 2 steps), each of whose crops also runs backwards; and every score is in range.

    Sampling 11 canvases twice each, not compiling, is this run's cost (the coherence row's backward passes most):
    it runs at XLA's default optimisation level, about 3x faster than in this process at level 0."""
    rows = main_at_default_optimisation("canvas", ["--smoke", "--workdir", str(smoke_workdir), "--out", str(tmp_path),
                                                   "--coherence", "1.0"], tmp_path)
    check_outputs(tmp_path, rows, "canvas",
                  ["32x128"] * 4 + ["32x256 circular"] * 3 + ["32x128"] * 3 + ["32x128 wrapped"], ["panoramas.png"])
    assert [r["strategy"] for r in rows] == ["overlap", "gaussian", "shifted", "overlap"] + \
        ["overlap", "gaussian", "shifted"] * 2 + ["shifted"]
    assert [r["coherence"] for r in rows] == [0.0, 0.0, 0.0, 1.0] + [0.0] * 7  # coherence: the plain panorama
    # SpotDiffusion's own wrap tiles the 128 columns with 4 windows, no clamped fifth: 13 / 4 > 3x fewer crops
    crops = [13, 13, 5, 13, 32, 32, 8, 13, 13, 5, 4]
    assert [r["crops_per_call"] for r in rows] == crops
    assert [r["evals_per_panorama"] for r in rows] == [(1 + r["regions"]) * (c * 2 + (r["coherence"] > 0))
                                                       for c, r in zip(crops, rows)]
    assert [r["grad_crops_per_panorama"] for r in rows] == [(1 + r["regions"]) * c * (r["coherence"] > 0)
                                                            for c, r in zip(crops, rows)]
    for row in rows:
        assert row["seconds_per_panorama"] > 0 and row["seam_ratio"] > 0 and row["coherence_distance"] >= 0
        assert_accuracy(row["crop_color_shape_accuracy"])


def test_canvas_wrapped_needs_the_shifted_strategy(tmp_path, capsys):
    """`wrapped` is SpotDiffusion's roll, a shifted-only canvas: by default it runs only beside shifted (so an
    overlap-only call such as the coherence ablation still runs the other canvases); asked for by name without
    shifted it is refused in one line, before any model loads."""
    assert canvas.selected_canvases(None, ["overlap"]) == ["panorama", "circular", "regions"]
    assert canvas.selected_canvases(None, ["overlap", "shifted"]) == ["panorama", "circular", "regions", "wrapped"]
    assert canvas.selected_canvases(["wrapped", "panorama"], ["shifted"]) == ["wrapped", "panorama"]
    with pytest.raises(SystemExit):
        canvas.main(["--smoke", "--out", str(tmp_path), "--canvases", "wrapped", "--strategies", "overlap"])
    assert "--canvases wrapped runs the shifted strategy only; add it to --strategies" in capsys.readouterr().err


def test_coherence_distance_is_the_mean_pairwise_crop_distance():
    """Crops of one panorama at features (0, 0), (3, 4), (0, 0): pairwise distances 5, 0, 5 -> mean 10/3; a
    second, uniform panorama scores 0; the mean over panoramas is 5/3. Rows are offset-major."""
    first = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    second = np.ones((3, 2))
    features = np.stack([first, second], axis=1).reshape(6, 2)  # crop k of panorama n at row k * 2 + n
    assert canvas.coherence_distance(features, per_canvas=3) == pytest.approx(5.0 / 3.0)


@pytest.mark.slow
def test_experts_smoke(smoke_workdir, shapes_data_dir, tmp_path, capsys):
    """Experts 1/2/3 at equal samples: a row per layout, E-1 sigma boundaries each, finite per-sigma losses."""
    rows = experts.main(["--smoke", "--workdir", f"1={smoke_workdir}", "--data_dir", shapes_data_dir,
                         "--out", str(tmp_path)])
    check_outputs(tmp_path, rows, "layout", ["1", "2", "3"], ["metrics.png", "val_loss_vs_sigma.png", "samples.png"])
    for label in ("1", "2", "3"):  # the reference table's breakdown per scored layout, as shapes_benchmark.py writes it
        assert "| relation | both colours | both shapes | relation | all |" in \
            (tmp_path / f"breakdown_{label}.md").read_text()
    # each expert is a whole UNet (stacked), so E experts hold E times one model's weights
    assert [row["parameters"] for row in rows] == [rows[0]["parameters"] * e for e in (1, 2, 3)]
    assert len({r["train_samples"] for r in rows}) == 1
    assert [r["boundaries"] for r in rows][0] == "-"
    assert [len(r["boundaries"].split("/")) for r in rows[1:]] == [1, 2]
    for row in rows:
        assert_accuracy(row["all_ok_accuracy"])
        assert_distances(row)
        for value, interval in (("two_object_relation_accuracy", "two_object_ci95"),
                                ("one_object_color_shape_strict_accuracy", "one_object_strict_ci95")):
            lo, hi = map(float, row[interval].split("-"))  # a Wilson interval holds its own estimate
            assert lo - 1e-9 <= row[value] <= hi + 1e-9, (value, row[value], row[interval])
        losses = [row[f"loss@{s:g}"] for s in (0.1, 1.0, 10.0)]
        assert all(np.isfinite(losses)) and min(losses) > 0
    assert (tmp_path / "workdirs" / "experts3").is_dir() and not (tmp_path / "workdirs" / "experts1").exists()
    # An ablation spanning sessions: score layout 3 again and keep 1 and 2 from the first call's CSV. Evaluation is
    # seeded, so the rescored row equals the first call's, and the kept rows are the CSV's, cell for cell.
    merged_out = tmp_path / "merged"
    again = ["--smoke", "--experts", "3", "--workdir", f"3={tmp_path / 'workdirs' / 'experts3'}",
             "--data_dir", shapes_data_dir]
    # plus a named variant's row (a copy of layout 1 labelled 1-wide): kept by its label, sorted after layout 1
    import csv

    with open(tmp_path / "results.csv", newline="") as f:
        earlier = list(csv.DictReader(f))
    with open(tmp_path / "with_variant.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(earlier[0]))
        writer.writeheader()
        writer.writerows([*earlier, {**earlier[0], "layout": "1-wide"}])
    merged = experts.main([*again, "--reuse", str(tmp_path / "with_variant.csv"), "--out", str(merged_out)])
    assert [r["layout"] for r in merged] == ["1", "1-wide", "2", "3"] and [r["experts"] for r in merged] == [1, 1, 2, 3]
    first, table = common.read_results(tmp_path), common.read_results(merged_out)
    assert table[1] == {**table[0], "layout": "1-wide"}
    for old, new in zip(first, [table[0], *table[2:]]):
        assert {k: v for k, v in old.items() if k not in ("sample_seconds", "workdir")} == \
               {k: v for k, v in new.items() if k not in ("sample_seconds", "workdir")}
    assert "kept from" in (merged_out / "results.md").read_text()
    (tmp_path / "old.csv").write_text("experts,train_samples\n1,48\n")
    for argv, message in ((["--seed", "1", "--reuse", str(tmp_path / "results.csv")],  # other noise: not comparable
                           r"scored with seed=0;.*this call with seed=1"),
                          (["--reuse", str(tmp_path / "old.csv")], "no `evaluation` column")):
        with pytest.raises(SystemExit):  # one line, before any model loads
            experts.main([*again, *argv, "--out", str(tmp_path / "x")])
        assert re.search(message, capsys.readouterr().err)


def test_experts_refuses_unequal_training_samples(tmp_path):
    """The headline ablation is at equal training samples: runs of different steps x batch are refused."""
    for num, steps in ((1, 6), (2, 3)):
        workdir = tmp_path / f"e{num}"
        workdir.mkdir()
        config = common.ablation_config(experts=num, steps=steps, batch=24, smoke=True)
        (workdir / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(ValueError, match="different numbers of samples"):
        experts.check_equal_samples({1: tmp_path / "e1", 2: tmp_path / "e2"})
    with pytest.raises(ValueError, match="--steps x --batch = 72"):  # checked before training the missing layouts
        experts.check_equal_samples({1: tmp_path / "e1"}, samples=3 * 24)
    experts.check_equal_samples({1: tmp_path / "e1"}, samples=6 * 24)
    with pytest.raises(ValueError, match="holds a 2-expert run"):
        experts.check_equal_samples({3: tmp_path / "e2"})
    with pytest.raises(ValueError, match="E=PATH"):
        experts.parse_workdirs(["workdirs/e1"])
    # A run time-boxed at step 3 of its 6 has trained 3 x 24 samples, what its checkpoint says, not its config.
    from ediff_jax.checkpoints import Checkpointer

    ckpt = Checkpointer(tmp_path / "e1", async_save=False)
    ckpt.save(3, {"w": np.zeros(2, np.float32)}, {"progress": {}}, force=True)
    ckpt.close()
    experts.check_equal_samples({1: tmp_path / "e1", 2: tmp_path / "e2"})
    with pytest.raises(ValueError, match="1 model: 3 steps x batch 24"):
        experts.check_equal_samples({1: tmp_path / "e1"}, samples=6 * 24)


def test_experts_rows_are_keyed_by_layout_label(tmp_path, capsys):
    """A variant of an expert count (1-wide: the capacity row) is its own row: labels parse, a reused table keeps
    the rows this call does not score by label (an old table's rows, keyed by count, get their count as label),
    and a named variant is never trained from a default config."""
    assert experts.parse_layout("2") == (2, "2") and experts.parse_layout(" 1-wide ") == (1, "1-wide")
    assert experts.layout_name("1") == "1 model" and experts.layout_name("3") == "3 experts"
    assert experts.layout_name("1-wide") == "1 model (wide)"
    for bad in ("4", "x", "1-", "1-a b", "2-wide/x"):
        with pytest.raises(ValueError, match="expert count 1, 2 or 3"):
            experts.parse_layout(bad)
    assert experts.parse_workdirs(["1-wide=runs/w", "3=runs/e3"]) == {"1-wide": Path("runs/w"), "3": Path("runs/e3")}
    table = tmp_path / "old.csv"
    table.write_text("experts,train_samples,evaluation,two_object_relation_accuracy\n"
                     "1,48,E,0.5\n2,48,E,0.6\n3,48,E,0.7\n")
    kept = experts.reused_rows(table, ["3", "1-wide"], "E", 48)
    assert [(r["layout"], r["experts"], r["parameters"]) for r in kept] == [("1", 1, "-"), ("2", 2, "-")]
    with pytest.raises(ValueError, match="its 2 row was trained on 48"):
        experts.reused_rows(table, ["1"], "E", 96)
    for cells in ("1,many,E,0.5", "4,48,E,0.5", ",48,E,0.5"):  # a hand-edited or foreign table: one line, no traceback
        (tmp_path / "bad.csv").write_text(f"experts,train_samples,evaluation,two_object_relation_accuracy\n{cells}\n")
        with pytest.raises(ValueError, match="line 2 has no readable layout and train_samples"):
            experts.reused_rows(tmp_path / "bad.csv", [], "E", 48)
    with pytest.raises(ValueError, match="no such file"):
        experts.reused_rows(tmp_path / "missing.csv", [], "E", 48)
    for argv, message in ((["--experts", "1-wide"], "named variant is not trained here; give its run with --workdir "
                                                    "1-wide=PATH"),
                          (["--experts", "1", "--workdir", "2=runs/e2"], "--workdir given for ['2']"),
                          (["--experts", "1", "--workdir", f"1={tmp_path}"], "holds no checkpoint; train it first"),
                          (["--experts", "1", "--reuse", str(tmp_path / "bad.csv")], "line 2 has no readable")):
        with pytest.raises(SystemExit):
            experts.main(["--smoke", *argv, "--out", str(tmp_path / "x")])
        assert message in capsys.readouterr().err


def test_sample_batched_pads_chunks_and_offsets_seeds():
    """Every sampler call sees the same batch size (one compile), chunk k gets seed + k, order is kept."""
    calls = []

    def fake_sampler(prompts, seed, extra_cond=None):
        calls.append((list(prompts), seed, None if extra_cond is None else extra_cond["w"].tolist()))
        return np.stack([np.full((2, 2, 3), int(p), np.uint8) for p in prompts])

    images = common.sample_batched(fake_sampler, ["1", "2", "3", "4", "5"], batch_size=2, seed=10,
                                   extra_cond={"w": np.arange(5.0)})
    assert images[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5]
    assert [len(p) for p, _, _ in calls] == [2, 2, 2]
    assert [s for _, s, _ in calls] == [10, 11, 12]
    assert [w for _, _, w in calls] == [[0.0, 1.0], [2.0, 3.0], [4.0, 4.0]]


def test_seam_ratio_sees_a_seam_and_ignores_smooth_canvases():
    """A brightness jump at a window boundary gives a ratio > 1; a linear ramp (uniform steps) gives 1."""
    ramp = np.tile(np.arange(64, dtype=np.float64)[None, None, :, None], (1, 8, 1, 3))
    assert stride.seam_ratio(ramp, 32) == pytest.approx(1.0)
    step = np.zeros((1, 8, 64, 3))
    step[:, :, 32:] = 100.0
    step += np.random.default_rng(0).uniform(0, 1, step.shape)
    assert stride.seam_ratio(step, 32) > 10


def test_validation_examples_match_the_dataset_captions():
    """The evaluation prompts are ediff_shapes captions the alignment scorer can parse."""
    from ediff_jax.eval import parse_prompt

    images, captions = common.validation_examples(6, 32)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    for caption in captions:
        parse_prompt(caption)


@pytest.mark.slow
def test_shapes_benchmark_smoke(smoke_workdir, tmp_path):
    """The reference-run scorer on a trained workdir: a row per kept checkpoint, the breakdown, the plots."""
    rows = shapes_benchmark.main(["--workdir", str(smoke_workdir), "--out", str(tmp_path), "--smoke"])
    table = check_outputs(tmp_path, rows, "step", [common.SMOKE_TRAIN_STEPS], ["curve.png", "samples.png"])
    assert int(table[0]["num_one_object"]) == 18 and int(table[0]["num_two_object"]) == 8
    assert int(table[0]["num_region"]) == 9
    for key in (*shapes_benchmark.GOALS, "region_accuracy"):
        assert_accuracy(rows[0][key])
    breakdown = (tmp_path / "breakdown.md").read_text()
    assert "| red |" in breakdown and "| top left |" in breakdown
    # --config trains a new workdir; given with a trained one it would be ignored, so it is refused
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        shapes_benchmark.main(["--workdir", str(smoke_workdir), "--out", str(tmp_path / "again"), "--smoke",
                               "--config", str(shapes_benchmark.CONFIG)])
    with pytest.raises(SystemExit, match=r"--step 999: .* keeps checkpoints \[3\]"):
        shapes_benchmark.main(["--workdir", str(smoke_workdir), "--out", str(tmp_path / "again"), "--smoke",
                               "--step", "999"])


def test_shapes_benchmark_refuses_flags_it_would_ignore(tmp_path):
    """--config with the fixed smoke model, or a config argument it does not know: one-line errors, nothing trained."""
    with pytest.raises(SystemExit, match="Drop one of them"):
        shapes_benchmark.main(["--out", str(tmp_path), "--smoke", "--config", str(shapes_benchmark.CONFIG)])
    with pytest.raises(SystemExit, match="unknown key 'xatn32'.*did you mean 'xattn32'"):
        shapes_benchmark.main(["--out", str(tmp_path), "--workdir", str(tmp_path / "fresh"),
                               "--config", f"{shapes_benchmark.CONFIG}:xatn32=true"])
    assert not (tmp_path / "fresh").exists()


def test_wilson_interval_matches_closed_forms():
    """0 of n: the upper end is z^2 / (n + z^2); 50 of 100: the textbook (0.404, 0.596)."""
    lo, hi = shapes_benchmark.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (10 + 1.96**2))
    lo, hi = shapes_benchmark.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert all(math.isnan(v) for v in shapes_benchmark.wilson_interval(0, 0))


def test_benchmark_prompts_cover_every_object_and_parse():
    """One-object prompts: every colour x shape equally often; relation prompts: two colours, a relation, seeded."""
    from ediff_jax.data.shapes import COLORS, SHAPES
    from ediff_jax.eval.prompts import parse_prompt

    one = shapes_benchmark.one_object_prompts(3)
    assert len(one) == 3 * len(COLORS) * len(SHAPES) and len(set(one)) == len(COLORS) * len(SHAPES)
    two = shapes_benchmark.relation_prompts(50, seed=1)
    assert two == shapes_benchmark.relation_prompts(50, seed=1) != shapes_benchmark.relation_prompts(50, seed=2)
    for prompt in two:
        parsed = parse_prompt(prompt)
        assert parsed.relation is not None and len(parsed.objects) == 2
        assert parsed.objects[0].color != parsed.objects[1].color
    regions = [parse_prompt(p).region for p in shapes_benchmark.region_prompts(27)]
    from ediff_jax.data.shapes import REGIONS

    assert sorted(regions) == sorted(REGIONS * 3)


@pytest.mark.slow
def test_pww_figure_smoke(smoke_workdir, tmp_path):
    """Two rows (w' = 0, then w'), each the painting then the samples; the painting shows both boxes."""
    grid = pww_figure.main(["--workdir", str(smoke_workdir), "--out", str(tmp_path / "pww.png"), "--num", "2"])
    assert (tmp_path / "pww.png").exists() and grid.shape[0] > grid.shape[1] / 3 > 0
    painted = pww_figure.painting(32)
    assert (painted == (220, 40, 40)).all(-1)[:16, 16:].any() and (painted == (40, 80, 220)).all(-1)[16:, :16].any()


def test_layout_probe_slope_reads_placement_from_pixels():
    """Discs of the prompt's colour drawn at each region's centre give slope 1 (and their exact
    centres); the same disc everywhere gives 0; discs at the mirrored regions give -1."""
    from ediff_jax.data.shapes import BACKGROUND

    prompts, colours, targets = layout_probe.probe_prompts(2)
    assert len(prompts) == 18 and targets.shape == (18, 2)
    size = 36
    ys, xs = np.mgrid[0:size, 0:size] + 0.5

    def draw(centres):
        images = np.tile(np.asarray(BACKGROUND, np.float32) / 127.5 - 1.0, (len(centres), size, size, 1))
        for image, (cy, cx), colour in zip(images, centres, colours):
            image[(ys - cy * size) ** 2 + (xs - cx * size) ** 2 <= 16] = colour
        return images

    centres, mass = layout_probe.colour_centres(draw(targets), colours)
    np.testing.assert_allclose(centres, targets, atol=1e-6)
    assert mass.min() > 40  # a radius-4 disc: about 50 pixels
    assert layout_probe.slope(centres, targets) == pytest.approx(1.0)
    still, _ = layout_probe.colour_centres(draw(np.full_like(targets, 0.5)), colours)
    assert layout_probe.slope(still, targets) == pytest.approx(0.0, abs=1e-6)
    mirrored, _ = layout_probe.colour_centres(draw(1.0 - targets), colours)
    assert layout_probe.slope(mirrored, targets) == pytest.approx(-1.0)


@pytest.mark.slow
def test_layout_probe_smoke(smoke_workdir, tmp_path):
    """The probe on a trained workdir: one finite row per sigma."""
    rows = layout_probe.main(["--workdir", str(smoke_workdir), "--out", str(tmp_path), "--smoke"])
    assert [r["sigma"] for r in rows] == [10.0, 1.0]
    assert all(math.isfinite(r["placement_slope"]) and r["num_prompts"] == 9 for r in rows)
    assert (tmp_path / "results.md").exists()


def test_shapes_benchmark_offers_every_sampler():
    """--sampler's choices are written out (no JAX import for --help); they must be the library's samplers."""
    from ediff_jax.edm import SAMPLERS, check_sampler

    assert set(shapes_benchmark.SAMPLER_NAMES) == set(SAMPLERS)
    with pytest.raises(ValueError, match="dpmpp_2m sampler needs at least 3 steps"):
        check_sampler("dpmpp_2m", 2)
    check_sampler("dpmpp_2m", None)  # the config's steps: checked where the config is read


def test_guidance_sweep_reads_per_expert_scales():
    """`--scales 4/2` is one scale per expert (highest noise first); anything else that is not a number is refused."""
    import argparse

    assert guidance.parse_scale("3") == 3.0 and guidance.parse_scale("4/2") == (4.0, 2.0)
    assert guidance.label((4.0, 2.0)) == "4/2" and guidance.label(1.5) == "1.5"
    for bad in ("x", "4/", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a guidance scale"):
            guidance.parse_scale(bad)
