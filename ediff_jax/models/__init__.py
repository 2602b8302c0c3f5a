"""Networks, selected by name from the config (`config.model.name`)."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from ediff_jax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet}


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
    """Instantiates `MODELS[model_config["name"]]` with the remaining keys as attributes.

    Unknown names and unknown attributes fail here, at the boundary, with the valid choices.
    """
    kwargs = dict(model_config)
    name = kwargs.pop("name", "unet")
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r} in config.model.name; choose one of {sorted(MODELS)}.")
    cls = MODELS[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"config.model has keys {unknown} that {cls.__name__} does not take; valid keys: {sorted(fields)}.")
    for key in ("channel_mult", "attn_resolutions", "cross_attn_resolutions", "attn_levels", "cross_attn_levels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if isinstance(kwargs.get("num_res_blocks"), (list, tuple)):
        kwargs["num_res_blocks"] = tuple(kwargs["num_res_blocks"])
    return cls(**kwargs)


def check_image_size(model: nn.Module, size: int) -> None:
    """Fails early when `size` cannot pass through all of the UNet's downsamplings."""
    levels = len(getattr(model, "channel_mult", (1,)))
    factor = 2 ** (levels - 1)
    if size % factor:
        raise ValueError(f"Image size {size} is not divisible by {factor}, which {levels} UNet levels need.")


__all__ = ["UNet", "MODELS", "build_model", "check_image_size"]
