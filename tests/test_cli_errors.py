"""Bad input to the command lines: one line naming the problem and the fix, no traceback,
nothing of the user's changed; and no library start-up banners (issue #16, section 4).

The flag and config cases fail before any model is built, so they run the CLIs as a user
does (a subprocess each, a few seconds for the imports).
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ediff_jax.config_utils import load_config, parse_arg
from ediff_jax.workdirs import read_workdir_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def run_cli(*args: str, timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env or ENV,
                          timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """Asserts a failed run whose stderr ends in one `error:` line, without a traceback; returns that line."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), result.stderr
    return last


@pytest.mark.parametrize("flags, problem, fix", [
    (["--num", "0"], "--num=0", "e.g. --num 4"),  # was: an IndexError from inside transformers
    (["--steps", "0"], "--steps=0", ">= 1"),  # was: silently sampled with the config's steps
    (["--sr_steps", "0", "--sr_workdir", "SR"], "--sr_steps=0", ">= 1"),
    (["--height", "0"], "--height=0", ">= 1"),
    (["--height", "64", "--stride", "0"], "--stride=0", ">= 1"),
    (["--height", "64", "--chunk_size", "-1"], "--chunk_size=-1", ">= 1"),
    (["--guidance", "nan"], "--guidance=nan", "finite number"),
    (["--num", "abc"], "--num=abc", "--helpshort"),  # absl's own parse error, was a traceback
])
def test_sample_flag_out_of_range(tmp_path, flags, problem, fix):
    """Checked before the workdir is read: nothing is loaded or written."""
    result = run_cli("-m", "ediff_jax.sample", f"--workdir={tmp_path}", "--prompt", "a red circle",
                     f"--out={tmp_path / 'out'}", *[str(tmp_path) if f == "SR" else f for f in flags])
    line = one_line_error(result)
    assert problem in line and fix in line, line
    assert not (tmp_path / "out").exists()


def test_sample_unquoted_prompt(tmp_path):
    """`--prompt a red circle`: was absl's whole usage text; now the one line says to quote it."""
    result = run_cli("-m", "ediff_jax.sample", f"--workdir={tmp_path}", "--prompt", "a", "red", "circle")
    assert "unexpected arguments ['red', 'circle']: quote a prompt" in one_line_error(result)


@pytest.mark.parametrize("spec, expected", [
    ("configs/quickstart.py:steps=abc",
     "configs/quickstart.py:steps=abc: 'steps' must be an integer (got 'abc'), e.g. steps=1200"),
    ("configs/sr_photos.py:residual=maybe", "'residual' must be true or false (got 'maybe')"),
    ("configs/quickstart.py:stesp=3", "unknown key 'stesp' (did you mean 'steps'?); the keys and their defaults"),
    ("configs/nothere.py", "config file 'configs/nothere.py' not found"),
])
def test_train_bad_config_argument(tmp_path, spec, expected):
    result = run_cli("-m", "ediff_jax.train", "--config", spec, f"--workdir={tmp_path / 'wd'}")
    assert expected in one_line_error(result)
    assert not (tmp_path / "wd").exists()


def test_every_config_file_parses_its_argument_with_parse_arg():
    """All configs/*.py report a bad argument the same way (and so the CLI's one line)."""
    files = sorted((REPO / "configs").glob("*.py"))
    assert len(files) >= 6
    for file in files:
        with pytest.raises(ValueError, match=r"unknown key 'nosuchkey'.*the keys and their defaults") as info:
            load_config(f"{file}:nosuchkey=1")
        assert str(info.value).startswith(f"{file}:nosuchkey=1: ")


def test_parse_arg_types():
    args = parse_arg("steps=7,lr=0.5,residual=FALSE,name=x,on=yes", steps=1, lr=1.0, residual=True, name="a", on=False)
    assert (args.steps, args.lr, args.residual, args.name, args.on) == (7, 0.5, False, "x", True)
    for arg, message in [("steps=1.5", "'steps' must be an integer (got '1.5')"),
                         ("lr=abc", "'lr' must be a finite number (got 'abc')"),
                         ("lr=nan", "'lr' must be a finite number (got 'nan')"),
                         ("residual=maybe", "'residual' must be true or false (got 'maybe'), e.g. residual=True"),
                         ("steps", "'steps' must look like key=value")]:
        with pytest.raises(ValueError) as info:
            parse_arg(arg, steps=1, lr=1.0, residual=True)
        assert message in str(info.value)


def _corrupt_workdir(tmp_path: Path) -> tuple[Path, bytes, dict]:
    """A workdir whose config.json was cut off mid-write; returns (workdir, its bytes, the full config)."""
    workdir = tmp_path / "wd"
    workdir.mkdir()
    config = load_config(str(REPO / "configs/base64.py:size=tiny"))
    full = config.to_json_best_effort(indent=2)
    broken = full[: len(full) // 2].encode()
    (workdir / "config.json").write_bytes(broken)
    return workdir, broken, json.loads(full)


def test_corrupt_config_json_is_named_and_left_unchanged(tmp_path):
    workdir, broken, _ = _corrupt_workdir(tmp_path)
    with pytest.raises(ValueError) as info:
        read_workdir_config(workdir)
    message = str(info.value)
    assert message.startswith(f"{workdir / 'config.json'} is not valid JSON (")
    assert "line " in message and "column " in message
    assert "left unchanged" in message and "rerunning `python -m ediff_jax.train --workdir" in message
    assert (workdir / "config.json").read_bytes() == broken

    (workdir / "config.json").write_text("[]")  # valid JSON, but not a config
    with pytest.raises(ValueError, match="holds an array, not a JSON object"):
        read_workdir_config(workdir)
    (workdir / "config.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(byte 0\)"):
        read_workdir_config(workdir)


@pytest.mark.parametrize("source", ["history", "checkpoint"])
def test_corrupt_config_json_fix_restores_it(tmp_path, source):
    """The fix offered names the newest saved copy, and its command does restore config.json."""
    workdir, broken, saved = _corrupt_workdir(tmp_path)
    if source == "history":  # as ediff_jax/resume_policy.py writes it; a damaged newer one is skipped
        (workdir / "config_history").mkdir()
        (workdir / "config_history" / "20250101T000000.000000Z_step0.json").write_text(
            json.dumps({"start_step": 0, "config": saved}))
        (workdir / "config_history" / "20250102T000000.000000Z_step4.json").write_text("{")
    else:  # checkpoint metadata holding the config (progress.config); step 10 is newer than step 9
        for step, config in [(9, {"model": {}}), (10, saved)]:
            (workdir / "checkpoints" / str(step) / "meta").mkdir(parents=True)
            (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text(
                json.dumps({"stage": "base", "progress": {"phase": 0, "config": config}}))
    with pytest.raises(ValueError) as info:
        read_workdir_config(workdir)
    message = str(info.value)
    newest_good = "20250101T000000.000000Z_step0.json" if source == "history" else "checkpoints/10/meta/metadata"
    assert newest_good in message, message
    assert (workdir / "config.json").read_bytes() == broken
    command = message.split("with this command: ", 1)[1]
    assert command.startswith("python -c ")
    subprocess.run(shlex.quote(sys.executable) + command[len("python"):], shell=True, check=True, cwd=tmp_path)
    assert json.loads(read_workdir_config(workdir).to_json_best_effort()) == saved


def test_sample_cli_corrupt_config_json(tmp_path):
    workdir, broken, _ = _corrupt_workdir(tmp_path)
    line = one_line_error(run_cli("-m", "ediff_jax.sample", f"--workdir={workdir}", "--prompt", "a red circle"))
    assert f"{workdir / 'config.json'} is not valid JSON" in line and "To fix it, re-create it" in line, line
    assert (workdir / "config.json").read_bytes() == broken


@pytest.mark.parametrize("cli", ["ediff_jax.train", "ediff_jax.sample"])
def test_cli_modules_quiet_library_banners_before_importing_them(cli):
    """Both CLIs set the variables at import time, before TensorFlow or transformers is loaded."""
    code = (f"import os, sys; import {cli}; "
            "print([m for m in ('tensorflow', 'transformers') if m in sys.modules], "
            "[os.environ.get(v) for v in ('TF_ENABLE_ONEDNN_OPTS', 'TRANSFORMERS_NO_ADVISORY_WARNINGS')])")
    env = {k: v for k, v in ENV.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    result = run_cli("-c", code, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] ['0', '1']"


# Runs a CLI module as a user's machine without PyTorch would (transformers then prints its
# "PyTorch was not found" advisory), and reports at exit which libraries were imported.
NO_TORCH_RUNNER = """
import atexit, importlib.util, runpy, sys
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else _find(name, *a, **k)
atexit.register(lambda: print("imported:", *[m for m in ("tensorflow", "transformers") if m in sys.modules],
                              file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_train_start_up_has_no_library_banners(tmp_path):
    """About 10 s: the cheapest run that imports both (builds the tiny model, looks up the dataset)."""
    runner = tmp_path / "no_torch.py"
    runner.write_text(NO_TORCH_RUNNER)
    env = {k: v for k, v in ENV.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS",
                                                       "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    result = run_cli(str(runner), "ediff_jax.train", "--config", "configs/base64.py:size=tiny",
                     "--config.data.name=nosuch/32", f"--workdir={tmp_path / 'wd'}", env=env, timeout=300)
    assert "imported: tensorflow transformers" in result.stderr, result.stderr  # the banners had their chance
    for noise in ("oneDNN", "PyTorch was not found", "absl::InitializeLog", "cpu_feature_guard"):
        assert noise not in result.stderr, result.stderr
    assert "error: Unknown dataset 'nosuch/32'" in result.stderr and "Traceback" not in result.stderr
