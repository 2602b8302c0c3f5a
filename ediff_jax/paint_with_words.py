"""Paint-with-words (eDiff-I, Balaji et al. 2022, section 4.3): place objects by painting.

The user paints a region per phrase of the prompt. Every cross-attention layer then adds
w * A to its unscaled logits QK^T, where A[i, j] is the painted value of query pixel i for
prompt token j, and

    w = w' * log(1 + sigma) * max(QK^T)

is large at high noise, where the layout forms, and fades as sigma -> 0, where details
form; the max makes w' independent of the scale of Q and K. The attention is then
softmax((QK^T + w A) / sqrt(d)).

How it is wired:
- `pww_cond` turns prompts and `{phrase: mask}` into two conditioning arrays, `pww_mask`
  [N, H, W, L] (L = T5 length + CLIP length + 1, the UNet's context order
  [T5 tokens ; CLIP tokens ; null token]) and `pww_weight` [N] (w'; 0 turns it off);
  pass them as `Sampler(...)(..., extra_cond=...)`. They are runtime inputs of the
  jitted sampler: a new painting or weight does not recompile.
- The UNet (`ediff_jax.models.unet`) pools `pww_mask` to each cross-attention resolution
  and gives every cross-attention layer a `bias_fn` built on `pww_bias`
  (`ediff_jax/models/pww_bias.py`, beside the layers, so the network does not import this
  file); sigma comes from its c_noise input. Self-attention gets no bias.
- `text.conditioning.unconditional` zeroes `pww_weight` and the masks, so the
  classifier-free guidance branch is never biased.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from ediff_jax.images import make_grid, save_png
from ediff_jax.models.pww_bias import MODES, pool_masks, pww_bias  # noqa: F401  (this module's public API)
from ediff_jax.spec import parse_paint  # noqa: F401  (re-exported: the CLI's parser)

MaskLike = Union[str, os.PathLike, np.ndarray, Any]  # a PNG path, an array, or a PIL image
Paint = Mapping[str, MaskLike]


# ---------------------------------------------------------------------------------------
# Masks: files or arrays -> [H, W] in [0, 1]
# ---------------------------------------------------------------------------------------


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = (int(s) for s in image_size)
    return h, w


def _array_to_mask(arr: np.ndarray, what: str) -> np.ndarray:
    """Validates and normalises an array to float32 [h, w] in [0, 1]."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        out = arr.astype(np.float32)
    elif arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr):
        out = arr.astype(np.float32)
        if out.size and (not np.all(np.isfinite(out)) or out.min() < 0.0 or out.max() > 1.0):
            raise ValueError(
                f"The mask for {what} has values in [{out.min():g}, {out.max():g}]; masks must lie in [0, 1] "
                "(or be uint8 0..255, or boolean)."
            )
    else:
        raise ValueError(f"The mask for {what} has dtype {arr.dtype}; give a numeric or boolean array.")
    if out.ndim == 3 and out.shape[-1] in (1, 3, 4):
        if out.shape[-1] == 4 and np.ptp(out[..., 3]) > 0:
            out = out[..., 3]  # an RGBA painting: the alpha channel is the stroke
        else:
            out = out[..., :3].mean(axis=-1)
    if out.ndim != 2 or min(out.shape) == 0:
        raise ValueError(
            f"The mask for {what} has shape {arr.shape}; give a 2-D [height, width] array (or [h, w, 1|3|4]) "
            "or a PNG path."
        )
    if not np.any(out > 0):
        raise ValueError(f"The mask for {what} is empty (all zero): paint its region with non-zero (white) pixels.")
    return np.ascontiguousarray(out, np.float32)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.exists():
        raise FileNotFoundError(f"Mask file {str(path)!r} not found.")
    try:
        with Image.open(path) as img:
            if "A" in img.getbands() or "transparency" in img.info:
                return np.asarray(img.convert("RGBA"))
            return np.asarray(img.convert("L"))
    except OSError as e:  # not an image (PIL.UnidentifiedImageError), truncated file, ...
        raise ValueError(f"Mask file {str(path)!r} could not be read as an image ({e}); give a PNG.") from None


def load_mask(mask: MaskLike, size: int | Sequence[int] | None = None, what: str = "a phrase") -> np.ndarray:
    """A painted region as float32 [H, W] in [0, 1], resized to `size` (None: as given).

    Accepts a PNG/image path (grayscale brightness; for an image with a varying alpha
    channel, the alpha), a PIL image, or an array (bool, uint8 0..255 or floats in
    [0, 1]; [h, w] or [h, w, 1|3|4]). Any size and aspect: the mask is stretched to the
    image (area averaging when shrinking, bilinear when enlarging). Empty masks are errors.
    """
    from PIL import Image

    if isinstance(mask, (str, os.PathLike)):
        arr = _read_png(Path(mask).expanduser())
    elif isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("RGBA") if "A" in mask.getbands() else mask.convert("L"))
    else:
        arr = np.asarray(mask)
    out = _array_to_mask(arr, what)
    if size is None:
        return out
    h, w = _size(size)
    if out.shape != (h, w):
        shrink = h <= out.shape[0] and w <= out.shape[1]
        img = Image.fromarray(out, mode="F").resize((w, h), Image.BOX if shrink else Image.BILINEAR)
        out = np.clip(np.asarray(img, np.float32), 0.0, 1.0)
        if not np.any(out > 0):
            raise ValueError(f"The mask for {what} vanished when resized to {h}x{w}: paint a larger region.")
    return out


# ---------------------------------------------------------------------------------------
# Phrases -> token positions, masks -> per-token masks in the UNet's context order
# ---------------------------------------------------------------------------------------


def phrase_token_positions(tokenizer: Any, prompt: str, phrase: str, max_length: int, encoder: str = "") -> list[int]:
    """Positions of `phrase`'s tokens in the prompt's token sequence, as the model sees it.

    The phrase is tokenized alone (no special tokens) and searched for as a contiguous
    subsequence of the prompt's tokens (padded/truncated to `max_length` exactly as
    `TextEncoders.tokenize` does), so a repeated word is resolved by its neighbours:
    in "a red circle and a red square", "red square" marks the second "red" only. A phrase
    that occurs several times marks every occurrence (paint a longer phrase to pick one).
    """
    if not phrase.strip():
        raise ValueError("An empty phrase cannot be painted; use a phrase of the prompt, e.g. 'red circle'.")
    target = list(tokenizer(phrase, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"])
    n = len(target)
    starts = [i for i in range(len(ids) - n + 1) if ids[i:i + n] == target] if n else []
    if not starts:
        full = list(tokenizer(prompt, truncation=False)["input_ids"])
        if n and any(full[i:i + n] == target for i in range(len(full) - n + 1)):
            raise ValueError(
                f"Phrase {phrase!r} lies beyond the {encoder} limit of {max_length} tokens in prompt {prompt!r}; "
                "shorten the prompt or move the phrase forward."
            )
        pieces = tokenizer.convert_ids_to_tokens
        raise ValueError(
            f"Phrase {phrase!r} is not in the prompt {prompt!r}: its {encoder} tokens {pieces(target)} do not occur "
            f"in the prompt's {pieces(ids)}. Paint a phrase copied word for word from the prompt."
        )
    return sorted({i + j for i in starts for j in range(n)})


def context_length(encoders: Any) -> int:
    """L of the UNet context [T5 tokens ; CLIP tokens ; null token]."""
    return int(encoders.t5_max_length) + int(encoders.clip_max_length) + 1


def phrase_in_prompt(encoders: Any, prompt: str, phrase: str) -> bool:
    """Whether `phrase` occurs, token for token, in `prompt` as the T5 encoder sees it."""
    target = list(encoders.t5_tokenizer(phrase, add_special_tokens=False)["input_ids"])
    ids = list(encoders.t5_tokenizer(prompt, truncation=False)["input_ids"])
    return bool(target) and any(ids[i:i + len(target)] == target for i in range(len(ids) - len(target) + 1))


def token_masks(encoders: Any, prompt: str, paint: Paint, image_size: int | Sequence[int],
                only_present: bool = False) -> np.ndarray:
    """Per-token masks [H, W, L] of one prompt, in the UNet's context order.

    Slot j of the last axis is token j of the context [T5 (t5_max_length) ; CLIP
    (clip_max_length) ; null]: each phrase's mask goes to the phrase's tokens in both
    sequences (special, padding and null tokens stay 0; tokens of overlapping phrases take
    the maximum). `image_size` is normally the image resolution; the UNet pools to every
    cross-attention resolution, so for large images the largest cross-attention resolution
    suffices and saves memory. A phrase missing from the prompt is an error, unless
    `only_present` (a canvas with region prompts: each prompt takes the phrases it has).
    """
    h, w = _size(image_size)
    lt, lc = int(encoders.t5_max_length), int(encoders.clip_max_length)
    out = np.zeros((h, w, lt + lc + 1), np.float32)
    for phrase, mask in paint.items():
        if only_present and not phrase_in_prompt(encoders, prompt, phrase):
            continue
        region = load_mask(mask, (h, w), what=repr(phrase))
        for tokenizer, max_length, offset, name in (
            (encoders.t5_tokenizer, lt, 0, "T5"),
            (encoders.clip_tokenizer, lc, lt, "CLIP"),
        ):
            for pos in phrase_token_positions(tokenizer, prompt, phrase, max_length, name):
                out[..., offset + pos] = np.maximum(out[..., offset + pos], region)
    return out


def pww_cond(
    encoders: Any,
    prompts: Sequence[str],
    paint: Paint | Sequence[Paint],
    image_size: int | Sequence[int],
    weight: float | Sequence[float] = 0.4,
    only_present: bool = False,
) -> dict[str, np.ndarray]:
    """`extra_cond` for `Sampler`: {"pww_mask": [N, H, W, L], "pww_weight": [N]} (float32).

    `paint` is one `{phrase: mask}` for every prompt, or one per prompt (an empty mapping
    leaves that prompt unpainted). `weight` is w', one for all or one per prompt. On a
    MultiDiffusion canvas, `image_size` is the canvas's (H, W) (the sampler cuts each crop's
    masks); with region prompts, `only_present` paints each prompt with the phrases it has.
    """
    prompts = [str(p) for p in prompts]
    paints = [paint] * len(prompts) if isinstance(paint, Mapping) else list(paint)
    if len(paints) != len(prompts):
        raise ValueError(f"Got {len(paints)} paintings for {len(prompts)} prompts; give one mapping or one per prompt.")
    weights = np.broadcast_to(np.asarray(weight, np.float32), (len(prompts),)).copy()
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"pww weight w' must be finite and >= 0, got {weight}.")
    cache: dict[tuple[str, int], np.ndarray] = {}
    masks = []
    for prompt, p in zip(prompts, paints):
        key = (prompt, id(p))
        if key not in cache:
            cache[key] = token_masks(encoders, prompt, p, image_size, only_present)
        masks.append(cache[key])
    return {"pww_mask": np.stack(masks), "pww_weight": weights}


# ---------------------------------------------------------------------------------------
# CLI support
# ---------------------------------------------------------------------------------------


def write_paint_record(out: Path, paint: Paint, raw: Mapping[str, np.ndarray], size: tuple[int, int],
                       weight: float) -> None:
    """`masks.png` (each phrase's mask at the output's size) and `paint.txt` (phrase=mask file, w') beside samples."""
    regions = np.stack([load_mask(m, tuple(size)) for m in raw.values()])
    save_png(make_grid(np.repeat(np.round(regions * 255).astype(np.uint8)[..., None], 3, -1)), out / "masks.png",
             upscale=max(1, 128 // int(size[0])))
    (out / "paint.txt").write_text("".join(f"{phrase}={mask if isinstance(mask, (str, os.PathLike)) else '<array>'}\n"
                                           for phrase, mask in paint.items()) + f"pww_weight={weight}\n")
