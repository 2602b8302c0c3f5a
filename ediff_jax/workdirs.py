"""A trained workdir, loaded for sampling: its config, and its model with one EMA of the weights.

Read-only, and restores only the EMA it is asked for (not the optimizer state or the other
EMAs), through the same checks and restore helper as training (`training.restore_checkpoint`).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ediff_jax import logs, posthoc_snapshots, sr
from ediff_jax.checkpoints import Checkpointer, skipped_like
from ediff_jax.config_utils import config_from_json
from ediff_jax.paths import as_path
from ediff_jax.training.experiment import build_experiment, restore_checkpoint


def read_workdir_config(workdir: str | Path) -> Any:
    """The config a workdir was trained with (over today's defaults); cheap, no checkpoint read.

    A config.json that does not read back (truncated, hand-edited) is a ValueError naming
    the file and where it breaks, left as it is, with the way to restore it: from the
    run's config history, the newest checkpoint's metadata, or by rerunning training.
    """
    config_path = as_path(workdir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: --workdir must be a directory written by ediff_jax.train.")
    try:
        return config_from_json(config_path.read_bytes().decode("utf-8"), source=str(config_path))
    except ValueError as e:
        problem = f"{config_path} is not UTF-8 text (byte {e.start})" if isinstance(e, UnicodeDecodeError) else str(e)

    def saved(path: Path, keys: tuple[str, ...]) -> bool:  # holds a readable config under `keys`
        try:
            value = json.loads(path.read_text())
            for key in keys:
                value = value[key]
            return isinstance(value, dict) and "model" in value
        except (OSError, ValueError, KeyError, TypeError):
            return False

    workdir = config_path.parent
    steps = sorted((int(d.name) for d in workdir.glob("checkpoints/*") if d.name.isdigit()), reverse=True)
    candidates = [(h, ("config",), "the run's config history")  # names: <UTC time>_step<N>.json, newest first
                  for h in sorted(workdir.glob("config_history/*.json"), reverse=True)]
    candidates += [(workdir / "checkpoints" / str(s) / "meta" / "metadata", ("progress", "config"),
                    "the newest checkpoint's metadata") for s in steps]
    found = next((c for c in candidates if saved(c[0], c[1])), None)
    if found is not None:
        path, keys, what = found
        index = "".join(f"[{k!r}]" for k in keys)
        fix = (f"restore it from {what} with this command: python -c \"import json; print(json.dumps(json.load("
               f"open({str(path)!r})){index}, indent=2))\" > {shlex.quote(str(config_path))}")
    else:
        fix = (f"re-create it by rerunning `python -m ediff_jax.train --workdir {workdir} --config ...` with the "
               "config (and --config.* overrides) it was trained with: that rewrites config.json and resumes from the "
               "latest checkpoint, which refuses the config of another model.")
    raise ValueError(f"{problem}; it was left unchanged. To fix it, {fix}")  # no final '.' after a command


def check_base_workdir(workdir: str | Path) -> None:
    """Text-to-image sampling needs a base model; an SR stage needs the previous stage's images."""
    config = read_workdir_config(workdir)
    if sr.is_sr(config):
        raise ValueError(
            f"{workdir} holds an SR stage ({config.sr.lowres_size} -> {config.data.image_size}), not a base model. "
            "Run it in a cascade after a base model: --workdir BASE --sr_workdir " + str(workdir) + "."
        )


def ema_field(config: Any, ema_decay: float | None) -> tuple[str, int | None]:
    """Which saved field holds the EMA of decay `ema_decay` (None: config.train.ema_decay):
    ("ema_params", None) or ("extra_emas", index)."""
    if ema_decay is None or float(ema_decay) == float(config.train.ema_decay):
        return "ema_params", None
    extra = [float(d) for d in config.train.extra_ema_decays]
    if float(ema_decay) not in extra:
        raise ValueError(f"This workdir keeps EMAs with decays {[float(config.train.ema_decay), *extra]}, not "
                         f"{ema_decay}; pick one of those (config.train.extra_ema_decays adds more when training).")
    return "extra_emas", extra.index(float(ema_decay))


def check_ema_choice(config: Any, ema_decay: float | None, ema_sigma_rel: float | None) -> tuple[str, int | None]:
    """The EMA asked for exists in a run of `config` (checked before any checkpoint is read): a tracked
    one (`ema_field`'s answer is returned) or, with `ema_sigma_rel`, post-hoc snapshots; not both."""
    field = ema_field(config, ema_decay)
    if ema_sigma_rel is not None:
        if ema_decay is not None:
            raise ValueError("Pick the EMA one way: --ema_decay (a tracked EMA) or --ema_sigma_rel (post-hoc), not both.")
        posthoc_snapshots.check_sigma_rel(config, ema_sigma_rel)
    return field


def load_workdir(workdir: str | Path, devices: list | None = None, ema_decay: float | None = None,
                 step: int | None = None, ema_sigma_rel: float | None = None) -> tuple[Any, Any, Any]:
    """Config, experiment and EMA params of a trained workdir (latest checkpoint, or `step`).

    For an expert ensemble the params are stacked and `exp.boundaries` holds the sigma
    boundaries stored with the checkpoint; pass both to `make_model_fn` / `Sampler`.
    `ema_decay` picks one of the EMAs kept in training (default: config.train.ema_decay).
    `step` loads that kept checkpoint instead of the newest (learning curves).
    `ema_sigma_rel` reconstructs the post-hoc EMA of that width (EDM2) from the run's snapshots
    at the newest snapshot up to the checkpoint's step (`posthoc_snapshots.reconstruct`; the
    step is `exp.restored_step`); it excludes `ema_decay`.

    Read-only: only that EMA is restored (not the optimizer state or the other EMAs), and
    nothing inside `checkpoints/` is created, moved or written, even when the newest
    checkpoint is damaged (then the previous one is used, with a warning).
    """
    workdir = as_path(workdir)
    config = read_workdir_config(workdir)
    name, index = check_ema_choice(config, ema_decay, ema_sigma_rel)
    ckpt = Checkpointer(workdir, read_only=True) if (workdir / "checkpoints").is_dir() else None
    if ckpt is None or not ckpt.all_steps():
        if ckpt is not None:
            ckpt.close()
        raise FileNotFoundError(f"No checkpoint in {workdir / 'checkpoints'}; train first.")
    exp = build_experiment(config, devices)

    def one_ema(abstract: Any) -> dict:
        field = getattr(abstract, name)
        if index is not None:  # one of the extra EMAs (saved as a list): the others are not read
            field = [entry if j == index else skipped_like(entry) for j, entry in enumerate(field)]
        return {name: field}

    try:
        restored = restore_checkpoint(exp, ckpt, fields=one_ema, step=step)
    finally:
        ckpt.close()
    step, saved = restored.step, restored.meta
    params = restored.tree[name] if index is None else restored.tree[name][index]
    if ema_sigma_rel is not None:
        abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params)
        phase = int(saved.get("progress", {}).get("phase", 0))
        params, step = posthoc_snapshots.reconstruct(workdir, abstract, ema_sigma_rel, up_to_step=step,
                                                     expert_intervals=exp.phases[phase] if exp.phases else None)
    if exp.phases:
        exp.boundaries = np.asarray(saved.get("progress", {})["boundaries"], np.float32)
    exp.restored_step = int(step)
    if ema_decay is not None:
        warn_if_ema_in_warmup(float(ema_decay), int(step))
    return config, exp, params


def warn_if_ema_in_warmup(decay: float, step: int) -> None:
    """An EMA picked by decay that the trainer's warm-up (`training.step.ema_decay_at`: decay capped at
    (1 + t) / (10 + t)) has kept from taking effect up to `step`. It then holds the same weights as
    every other EMA of at least the cap, so comparing them would compare a model with itself."""
    cap = step / (step + 9.0)  # the decay of the last update, at t = step - 1
    if decay > cap:
        reached = math.ceil(9.0 * decay / (1.0 - decay) - 1e-6)  # the first step whose cap is >= decay
        logs.warning(f"EMA decay {decay:g} has not taken effect by step {step}: the trainer's warm-up caps every "
                     f"decay at {cap:.4f} until step {reached}, so this EMA equals every other EMA of decay >= "
                     f"{cap:.4f} kept in this run.")
