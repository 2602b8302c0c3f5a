"""Text-to-image sampling with a trained UNet: prompts -> uint8 images.

One `Sampler` compiles one program per (batch size, steps) and reuses it; the guidance
scale, seed, prompts and weights are runtime arguments, so sweeping them does not
recompile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax import edm, experts, logs, parallel, sr
from ediff_jax.images import ensure_writable_dir, make_grid, save_png, to_uint8
from ediff_jax.paths import as_path
from ediff_jax.text.conditioning import TextEncoders, select_encoders, unconditional


def make_model_fn(model: nn.Module, params: Any, sigma_data: float,
                  boundaries: Any = None) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """D(x; sigma, cond) for the EDM samplers and `edm.guided_denoiser`.

    With `boundaries`, `params` are stacked experts and each call runs the one expert
    whose sigma interval holds sigma (`experts.ensemble_denoiser`).
    """

    def single(p: Any) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
        denoise = edm.denoiser_from_network(lambda xs, c_noise, cond: model.apply({"params": p}, xs, c_noise, cond),
                                            sigma_data)
        if not getattr(model, "lowres_residual", False):
            return denoise
        # SR residual stages: up(lowres) + D(x - up), lowres from each call's cond (crops included)
        return lambda x, sigma, cond: sr.residual_denoiser(denoise, cond["lowres"])(x, sigma, cond)

    if boundaries is None:
        return single(params)
    return experts.ensemble_denoiser(lambda p, x, sigma, cond: single(p)(x, sigma, cond), params, boundaries)


class Sampler:
    """Text-to-image (or, for an SR stage, text + low-res image to image) sampling.

    `image_size` is an int (square) or (height, width): an SR stage is fully
    convolutional, so it can run on a canvas of another shape (a panorama), given a
    low-res input `lowres_factor` times smaller. With a `mesh`, the batch is spread over
    its data axes (params must then live on that mesh, as `load_workdir` places them).
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: TextEncoders,
        *,
        image_size: int | tuple[int, int],
        steps: int = 32,
        sampler: str = "heun",
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        progress: bool = False,
        boundaries: Any = None,
        lowres_factor: int = 1,
        mesh: Any = None,
    ):
        edm.check_sampler(sampler, steps)
        height, width = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
        self.model, self.encoders, self.image_size = model, encoders, image_size
        self.height, self.width = int(height), int(width)
        self.sigma_data = sigma_data
        self.is_sr = bool(getattr(model, "lowres_cond", False))
        self.lowres_factor = int(lowres_factor)
        self.mesh = mesh
        if self.is_sr and self.lowres_factor < 2:
            raise ValueError("An SR stage needs lowres_factor >= 2 (image size / low-res size).")
        self.sigmas = edm.karras_sigmas(steps, sigma_min, sigma_max)
        sample_fn = edm.SAMPLERS[sampler]

        def run(params: Any, enc_params: Any, tokens: Any, extra_cond: Any, rng: jax.Array, guidance: jax.Array,
                use_t5: bool, use_clip: bool) -> jax.Array:
            cond = {**select_encoders(encoders.encode(enc_params, tokens), use_t5, use_clip), **extra_cond}
            if "lowres" in cond:  # noise-conditioning augmentation at the chosen level
                cond["lowres"] = sr.noise_lowres(jax.random.fold_in(rng, 2), cond["lowres"], cond["aug_level"])
            model_fn = make_model_fn(model, params, sigma_data, boundaries)
            denoise = edm.guided_denoiser(model_fn, cond, unconditional(cond), guidance)
            batch = tokens["t5_ids"].shape[0]
            x = sr.initial_state(rng, (batch, self.height, self.width, 3), self.sigmas[0], cond.get("lowres"),
                                 bool(getattr(model, "lowres_residual", False)))
            return sample_fn(denoise, x, self.sigmas, progress=progress)

        self._run = jax.jit(run, static_argnames=("use_t5", "use_clip"))

    def __call__(self, params: Any, prompts: Sequence[str], *, guidance: float = 3.0, seed: int = 0,
                 use_t5: bool = True, use_clip: bool = True, extra_cond: dict | None = None,
                 lowres: Any = None, aug_level: float = 0.0) -> np.ndarray:
        """Samples one image per prompt; returns uint8 [N, H, W, 3].

        `extra_cond` holds further conditioning arrays with leading batch axis N (e.g.
        paint-with-words masks); they are runtime inputs, so new values do not recompile.
        `unconditional()` decides what the guidance branch sees of them. An SR stage
        takes `lowres` (uint8 or [-1, 1] floats, [N, H/f, W/f, 3]) and the
        noise-augmentation level `aug_level` (0: the input as it is).
        """
        prompts = list(prompts)
        extra = dict(extra_cond or {})
        if self.is_sr:
            if lowres is None:
                raise ValueError("This is a super-resolution stage: pass `lowres`, the previous stage's images.")
            sr.check_lowres_shape(lowres, len(prompts), self.height, self.width, self.lowres_factor)
            if aug_level < 0:
                raise ValueError(f"aug_level={aug_level} must be >= 0 (the std of the noise added to the low-res input).")
            extra["lowres"] = sr.lowres_to_model(lowres)
            extra["aug_level"] = np.full((len(prompts),), aug_level, np.float32)
        elif lowres is not None:
            raise ValueError("`lowres` was given, but this model is a base (text-to-image) model, not an SR stage.")
        tokens = self.encoders.tokenize(prompts)
        if self.mesh is not None and len(prompts) % parallel.data_parallel_size(self.mesh) == 0:
            tokens, extra = parallel.shard_batch((tokens, extra), self.mesh)
        images = self._run(params, self.encoders.params, tokens, extra, jax.random.PRNGKey(seed),
                           jnp.float32(guidance), use_t5=use_t5, use_clip=use_clip)
        return to_uint8(jax.device_get(images))


def read_workdir_config(workdir: str | Path) -> Any:
    """The config a workdir was trained with (over today's defaults); cheap, no checkpoint read.

    A config.json that does not read back (truncated, hand-edited) is a ValueError naming
    the file and where it breaks, left as it is, with the way to restore it: from the
    run's config history, the newest checkpoint's metadata, or by rerunning training.
    """
    import json
    import shlex

    from ediff_jax.config_utils import config_from_json

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


def write_samples(images: np.ndarray, out: Path, num: int, prompt_lines: Sequence[str], cols: int | None = None) -> None:
    """One PNG per image (named prompt_sample), `grid.png` and `prompts.txt`."""
    upscale = max(1, 128 // images.shape[1])
    for i, img in enumerate(images):
        save_png(img, out / f"{i // num:02d}_{i % num:02d}.png", upscale=upscale)
    save_png(make_grid(images, cols=cols or num), out / "grid.png", upscale=upscale)
    (out / "prompts.txt").write_text("\n".join(prompt_lines) + "\n")


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


def load_workdir(workdir: str | Path, devices: list | None = None,
                 ema_decay: float | None = None, step: int | None = None) -> tuple[Any, Any, Any]:
    """Config, experiment and EMA params of a trained workdir (latest checkpoint, or `step`).

    For an expert ensemble the params are stacked and `exp.boundaries` holds the sigma
    boundaries stored with the checkpoint; pass both to `make_model_fn` / `Sampler`.
    `ema_decay` picks one of the EMAs kept in training (default: config.train.ema_decay).
    `step` loads that kept checkpoint instead of the newest (learning curves).

    Read-only: only that EMA is restored (not the optimizer state or the other EMAs), and
    nothing inside `checkpoints/` is created, moved or written, even when the newest
    checkpoint is damaged (then the previous one is used, with a warning).
    """
    from ediff_jax import trainer
    from ediff_jax.checkpoints import Checkpointer, skipped_like

    workdir = as_path(workdir)
    config = read_workdir_config(workdir)
    name, index = ema_field(config, ema_decay)
    ckpt = Checkpointer(workdir, read_only=True) if (workdir / "checkpoints").is_dir() else None
    if ckpt is None or not ckpt.all_steps():
        if ckpt is not None:
            ckpt.close()
        raise FileNotFoundError(f"No checkpoint in {workdir / 'checkpoints'}; train first.")
    exp = trainer.build_experiment(config, devices)

    def abstract_for(saved: dict) -> Any:
        abstract, _, _ = trainer.checked_abstract_state(exp, ckpt, saved)
        field = getattr(abstract, name)
        if index is None:
            return field
        # One of the extra EMAs (saved as a list): the others are not read.
        return [entry if j == index else skipped_like(entry) for j, entry in enumerate(field)]

    def restore(at: int, abstract: Any) -> Any:
        restored = ckpt.restore_fields(at, {name: abstract})[name]
        return restored if index is None else restored[index]

    try:
        if step is None:
            step, params, saved = ckpt.restore_latest_good(abstract_for, restore)
        else:
            if int(step) not in ckpt.all_steps():
                raise FileNotFoundError(f"No checkpoint of step {step} in {ckpt.directory}; the kept steps are "
                                        f"{ckpt.all_steps()}.")
            saved = ckpt.read_meta(int(step))
            params = restore(int(step), abstract_for(saved))
    finally:
        ckpt.close()
    if exp.phases:
        exp.boundaries = np.asarray(saved.get("progress", {})["boundaries"], np.float32)
    exp.restored_step = int(step)
    if ema_decay is not None:
        warn_if_ema_in_warmup(float(ema_decay), int(step))
    return config, exp, params


def warn_if_ema_in_warmup(decay: float, step: int) -> None:
    """An EMA picked by decay that the trainer's warm-up (`trainer.ema_decay_at`: decay capped at
    (1 + t) / (10 + t)) has kept from taking effect up to `step`. It then holds the same weights as
    every other EMA of at least the cap, so comparing them would compare a model with itself."""
    import math

    cap = step / (step + 9.0)  # the decay of the last update, at t = step - 1
    if decay > cap:
        reached = math.ceil(9.0 * decay / (1.0 - decay) - 1e-6)  # the first step whose cap is >= decay
        logs.warning(f"EMA decay {decay:g} has not taken effect by step {step}: the trainer's warm-up caps every "
                     f"decay at {cap:.4f} until step {reached}, so this EMA equals every other EMA of decay >= "
                     f"{cap:.4f} kept in this run.")


def sample_from_workdir(
    workdir: str | Path,
    prompts: Sequence[str],
    *,
    num: int = 4,
    guidance: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    sampler: str | None = None,
    out: str | Path | None = None,
    use_t5: bool = True,
    use_clip: bool = True,
    progress: bool = True,
    ema_decay: float | None = None,
    extra_cond_fn: Callable[[Any, list[str]], dict] | None = None,
) -> np.ndarray:
    """Writes one PNG per image and `grid.png` (a row per prompt) to `out`; returns the images.

    `extra_cond_fn(exp, prompts)` may add conditioning arrays for the expanded prompt list
    (e.g. paint-with-words masks, see `Sampler.__call__`).
    """
    if not prompts:
        raise ValueError("Give at least one prompt.")
    check_base_workdir(workdir)  # a mistyped --workdir fails here, before any folder is made
    config = read_workdir_config(workdir)
    edm.check_sampler(sampler or str(config.sample.sampler), int(config.sample.steps) if steps is None else steps)
    out = ensure_writable_dir(out or as_path(workdir) / "samples")  # before any heavy work
    config, exp, ema_params = load_workdir(workdir, ema_decay=ema_decay)
    sample = Sampler(exp.model, exp.encoders, image_size=int(config.data.image_size),
                     steps=int(config.sample.steps) if steps is None else steps, sampler=sampler or config.sample.sampler,
                     sigma_data=float(config.edm.sigma_data), progress=progress, boundaries=exp.boundaries)
    guidance = float(config.sample.guidance) if guidance is None else float(guidance)
    expanded = [p for p in prompts for _ in range(num)]
    extra = extra_cond_fn(exp, expanded) if extra_cond_fn else None
    images = sample(ema_params, expanded, guidance=guidance, seed=seed, use_t5=use_t5, use_clip=use_clip,
                    extra_cond=extra)
    write_samples(images, out, num, prompts)
    return images
