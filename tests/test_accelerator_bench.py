"""experiments/benchmarks/accelerator.sh: runs unedited, writes one table, and its figures are consistent.

It is written for lent accelerators that this project rarely gets; these tests run the same code at
CPU sizes, so a lent machine only has to run it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.benchmarks import accelerator

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments/benchmarks/accelerator.sh"


def _rows(markdown: str) -> dict[tuple[str, str], tuple[str, str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("section", "---"):
            rows[cells[0], cells[1]] = cells[2], cells[3]
    return rows


def _number(text: str) -> float:
    return float(re.match(r"[-+0-9.e]+", text).group())


@pytest.mark.slow
def test_tiny_run_measures_every_section_consistently(tmp_path, capsys):
    accelerator.main(["--size", "tiny", "--out", str(tmp_path), "--train_maps", "unroll"])
    written = (tmp_path / "accelerator.md").read_text()
    assert written in capsys.readouterr().out  # the printed table is the file
    rows = _rows(written)
    assert not [k for k, (v, _) in rows.items() if v == "skipped"]
    sizes = accelerator.SIZES["tiny"]
    step_s = _number(rows["train step", "step time, median (s)"][0])
    # images/s is the batch over the step time; MFU is FLOPs / (time x peak), a fraction
    assert _number(rows["train step", "images/s per chip"][0]) == pytest.approx(sizes.train_batch / step_s, rel=0.01)
    mfu_value, mfu_note = rows["train step", "MFU"]
    peak = _number(re.search(r"against ([0-9.]+) TFLOP/s", mfu_note).group(1)) * 1e12
    flops_per_image = _number(rows["train step", "XLA FLOPs per image"][0]) * 1e9
    assert 0 < _number(mfu_value) <= 100
    assert _number(mfu_value) / 100 == pytest.approx(flops_per_image * sizes.train_batch / (step_s * peak), rel=0.1)
    single = _number(rows["experts, training", "step time, 1 model (s)"][0])
    unroll, note = rows["experts, training", "step time, 3 experts, train_map=unroll (s)"]
    assert _number(re.search(r"per sample ([0-9.]+)x", note).group(1)) == pytest.approx(single / _number(unroll), abs=0.01)
    assert ("experts, training", "step time, 3 experts, train_map=vmap (s)") not in rows  # only the maps asked for
    # the vmapped views and the loop over views compute the same fused denoiser
    md_note = rows["MultiDiffusion", "one denoiser call, Python loop over views (ms)"][1]
    assert float(re.search(r"difference ([0-9.e+-]+)", md_note).group(1)) < 1e-4
    assert "3 views" in rows["MultiDiffusion", "one denoiser call, vmapped views (ms)"][1]  # 32x64, window 32, stride 16
    t1 = sizes.sample_batch / _number(rows["sampling", "images/s, 1 model"][0])
    t3, ratio_note = sizes.sample_batch / _number(rows["sampling", "images/s, 3 experts"][0]), rows["sampling", "images/s, 3 experts"][1]
    assert _number(re.search(r"time ([0-9.]+)x", ratio_note).group(1)) == pytest.approx(t3 / t1, rel=0.02)


def _script(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd="/", timeout=300)


def test_script_runs_from_anywhere_and_a_spent_budget_still_writes_the_table(tmp_path):
    """The wrapper needs no editing: from another folder, with its output folder taken from $OUT (the lent
    machine's return folder), a run whose budget is spent writes every section as skipped and exits 0."""
    result = _script(["", "--size", "tiny", "--budget_s", "0"], env={"OUT": str(tmp_path / "out")})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _rows((tmp_path / "out" / "accelerator.md").read_text())
    assert {section for section, _ in rows} == set(accelerator.SECTIONS)
    assert all(value == "skipped" for value, _ in rows.values())
    assert "| train step | - | skipped |" in result.stdout  # the table is printed too


def test_negative_budget_is_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.benchmarks.accelerator", "--budget_s", "-1",
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--budget_s=-1.0 is negative" in result.stderr
    assert not (tmp_path / "accelerator.md").exists()
