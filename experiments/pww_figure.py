"""The README's paint-with-words picture: the same prompt and noise, without and with a painting.

  python experiments/pww_figure.py --workdir workdirs/shapes_benchmark --out docs/images/paint_with_words.png

Row 1: the painting (each phrase's mask in its colour), then `--num` samples without
painting (w' = 0). Row 2: the painting again, then the same seeds with w' = `--weight`. The
layout asks for what the data rarely shows unprompted: the red circle top right, the blue
square bottom left. One compiled sampler serves both rows (w' is a runtime input).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from experiments.ablations import common

PROMPT = "a red circle and a blue square"
# phrase -> (top, left, bottom, right) as fractions of the side, and the colour it is drawn in
LAYOUT = {"red circle": ((0.08, 0.55, 0.45, 0.92), (220, 40, 40)),
          "blue square": ((0.55, 0.08, 0.92, 0.45), (40, 80, 220))}


def masks(size: int) -> dict[str, np.ndarray]:
    """The layout's boxes as float masks [size, size] (1 inside)."""
    out = {}
    for phrase, ((top, left, bottom, right), _) in LAYOUT.items():
        m = np.zeros((size, size), np.float32)
        m[round(top * size):round(bottom * size), round(left * size):round(right * size)] = 1.0
        out[phrase] = m
    return out


def painting(size: int) -> np.ndarray:
    """The painting as an image: the background grey, each box in its phrase's colour."""
    img = np.full((size, size, 3), 240, np.uint8)
    for phrase, mask in masks(size).items():
        img[mask > 0] = LAYOUT[phrase][1]
    return img


def main(argv: list[str] | None = None) -> np.ndarray:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="A trained base-model workdir.")
    p.add_argument("--out", required=True, help="Output PNG.")
    p.add_argument("--num", type=int, default=6, help="Samples per row.")
    p.add_argument("--weight", type=float, default=1.0, help="Paint-with-words weight w' of row 2.")
    p.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the workdir's).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from ediff_jax.images import make_grid, save_png
    from ediff_jax.paint_with_words import pww_cond

    model = common.load_model(args.workdir)
    size, sampler = model.image_size, model.sampler()
    guidance = model.guidance if args.guidance is None else args.guidance
    prompts = [PROMPT] * args.num
    rows = []
    for weight in (0.0, args.weight):
        extra = pww_cond(model.exp.encoders, prompts, masks(size), size, weight)
        images = sampler(model.params, prompts, guidance=guidance, seed=args.seed, extra_cond=extra)
        rows.append(np.concatenate([painting(size)[None], np.asarray(images)]))
    grid = make_grid(np.concatenate(rows), cols=args.num + 1)
    save_png(grid, Path(args.out), upscale=max(1, 64 // size))
    print(f"Wrote {args.out}: '{PROMPT}', row 1 w'=0, row 2 w'={args.weight:g}, guidance {guidance:g}.")
    return grid


if __name__ == "__main__":
    main()
