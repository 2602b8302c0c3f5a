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

from ediff_jax import edm, experts
from ediff_jax.images import ensure_writable_dir, make_grid, save_png, to_uint8
from ediff_jax.text.conditioning import TextEncoders, select_encoders, unconditional

SAMPLERS = {"heun": edm.heun_sample, "euler": edm.euler_sample}


def make_model_fn(model: nn.Module, params: Any, sigma_data: float,
                  boundaries: Any = None) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """D(x; sigma, cond) for the EDM samplers and `edm.guided_denoiser`.

    With `boundaries`, `params` are stacked experts and each call runs the one expert
    whose sigma interval holds sigma (`experts.ensemble_denoiser`).
    """

    def single(p: Any) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
        return edm.denoiser_from_network(lambda xs, c_noise, cond: model.apply({"params": p}, xs, c_noise, cond),
                                         sigma_data)

    if boundaries is None:
        return single(params)
    return experts.ensemble_denoiser(lambda p, x, sigma, cond: single(p)(x, sigma, cond), params, boundaries)


def check_sampler_args(sampler: str, steps: int) -> None:
    """Shared boundary checks of the single-canvas and MultiDiffusion samplers."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")


class Sampler:
    def __init__(
        self,
        model: nn.Module,
        encoders: TextEncoders,
        *,
        image_size: int,
        steps: int = 32,
        sampler: str = "heun",
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        progress: bool = False,
        boundaries: Any = None,
    ):
        check_sampler_args(sampler, steps)
        self.model, self.encoders, self.image_size = model, encoders, image_size
        self.sigma_data = sigma_data
        self.sigmas = edm.karras_sigmas(steps, sigma_min, sigma_max)
        sample_fn = SAMPLERS[sampler]

        def run(params: Any, enc_params: Any, tokens: Any, extra_cond: Any, rng: jax.Array, guidance: jax.Array,
                use_t5: bool, use_clip: bool) -> jax.Array:
            cond = {**select_encoders(encoders.encode(enc_params, tokens), use_t5, use_clip), **extra_cond}
            model_fn = make_model_fn(model, params, sigma_data, boundaries)
            denoise = edm.guided_denoiser(model_fn, cond, unconditional(cond), guidance)
            batch = tokens["t5_ids"].shape[0]
            x = jax.random.normal(rng, (batch, image_size, image_size, 3)) * self.sigmas[0]
            return sample_fn(denoise, x, self.sigmas, progress=progress)

        self._run = jax.jit(run, static_argnames=("use_t5", "use_clip"))

    def __call__(self, params: Any, prompts: Sequence[str], *, guidance: float = 3.0, seed: int = 0,
                 use_t5: bool = True, use_clip: bool = True, extra_cond: dict | None = None) -> np.ndarray:
        """Samples one image per prompt; returns uint8 [N, H, W, 3].

        `extra_cond` holds further conditioning arrays with leading batch axis N (e.g.
        paint-with-words masks); they are runtime inputs, so new values do not recompile.
        `unconditional()` decides what the guidance branch sees of them.
        """
        tokens = self.encoders.tokenize(list(prompts))
        images = self._run(params, self.encoders.params, tokens, dict(extra_cond or {}), jax.random.PRNGKey(seed),
                           jnp.float32(guidance), use_t5=use_t5, use_clip=use_clip)
        return to_uint8(jax.device_get(images))


def read_workdir_config(workdir: str | Path) -> Any:
    """The config a workdir was trained with (over today's defaults); cheap, no checkpoint read."""
    from ediff_jax.config_utils import config_from_json

    config_path = Path(workdir).expanduser() / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: --workdir must be a directory written by ediff_jax.train.")
    return config_from_json(config_path.read_text())


def write_samples(images: np.ndarray, out: Path, num: int, prompt_lines: Sequence[str], cols: int | None = None) -> None:
    """One PNG per image (named prompt_sample), `grid.png` and `prompts.txt`."""
    upscale = max(1, 128 // images.shape[1])
    for i, img in enumerate(images):
        save_png(img, out / f"{i // num:02d}_{i % num:02d}.png", upscale=upscale)
    save_png(make_grid(images, cols=cols or num), out / "grid.png", upscale=upscale)
    (out / "prompts.txt").write_text("\n".join(prompt_lines) + "\n")


def load_workdir(workdir: str | Path, devices: list | None = None) -> tuple[Any, Any, Any]:
    """Config, experiment and EMA params of a trained workdir (latest checkpoint).

    For an expert ensemble the params are stacked and `exp.boundaries` holds the sigma
    boundaries stored with the checkpoint; pass both to `make_model_fn` / `Sampler`.
    """
    from ediff_jax import trainer
    from ediff_jax.checkpoints import Checkpointer, abstract_with_shardings

    workdir = Path(workdir).expanduser()
    config = read_workdir_config(workdir)
    ckpt = Checkpointer(workdir, async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"No checkpoint in {ckpt.directory}; train first.")
    exp = trainer.build_experiment(config, devices)
    saved = ckpt.read_meta()
    trainer.check_checkpoint_kind(saved, exp)
    ckpt.check_compatible(trainer.model_meta(config))
    progress = saved.get("progress", {})
    abstract, shardings = trainer.state_shardings(exp, int(progress.get("phase", 0)))
    state = ckpt.restore(abstract_with_shardings(abstract, shardings))
    ckpt.close()
    if exp.phases:
        exp.boundaries = np.asarray(progress["boundaries"], np.float32)
    return config, exp, state.ema_params


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
    extra_cond_fn: Callable[[Any, list[str]], dict] | None = None,
) -> np.ndarray:
    """Writes one PNG per image and `grid.png` (a row per prompt) to `out`; returns the images.

    `extra_cond_fn(exp, prompts)` may add conditioning arrays for the expanded prompt list
    (e.g. paint-with-words masks, see `Sampler.__call__`).
    """
    if not prompts:
        raise ValueError("Give at least one prompt.")
    out = ensure_writable_dir(out or Path(workdir).expanduser() / "samples")  # before any heavy work
    config, exp, ema_params = load_workdir(workdir)
    sample = Sampler(exp.model, exp.encoders, image_size=int(config.data.image_size),
                     steps=steps or int(config.sample.steps), sampler=sampler or config.sample.sampler,
                     sigma_data=float(config.edm.sigma_data), progress=progress, boundaries=exp.boundaries)
    guidance = float(config.sample.guidance) if guidance is None else float(guidance)
    expanded = [p for p in prompts for _ in range(num)]
    extra = extra_cond_fn(exp, expanded) if extra_cond_fn else None
    images = sample(ema_params, expanded, guidance=guidance, seed=seed, use_t5=use_t5, use_clip=use_clip,
                    extra_cond=extra)
    write_samples(images, out, num, prompts)
    return images
