"""Paint-with-words placement accuracy on ediff_shapes prompts, with and without painting.

For two-object prompts ("a red circle and a blue square") and mask layouts (left/right
halves, top/bottom halves, diagonal quadrants), every image is sampled once per w' with
the same seed (paired noise; w' = 0 is exactly plain sampling). Objects are found from
pixels: the pixels whose nearest palette colour (or background) is the object's colour,
within `TOL`; the object's centre is their centre of mass. Placement accuracy is the
fraction of detected objects whose centre lies inside their painted region.

  python experiments/pww_placement.py --workdir /tmp/wd_q --num 4 --pww_weight 0 0.4 1.0 \\
      --out experiments/results/pww_placement

`--smoke` runs in seconds on a tiny untrained model (for the test suite): the numbers are
meaningless, the pipeline is real. Writes `placement.md`, `placement.csv` and a grid per w'.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from ediff_jax.data.shapes import BACKGROUND, PALETTE

Box = tuple[float, float, float, float]  # normalised (y0, x0, y1, x1), the shapes bbox order

# Two regions per layout: the first object's, the second object's.
LAYOUTS: dict[str, tuple[Box, Box]] = {
    "left/right": ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)),
    "right/left": ((0.0, 0.5, 1.0, 1.0), (0.0, 0.0, 1.0, 0.5)),
    "top/bottom": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)),
    "bottom/top": ((0.5, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 1.0)),
    "topleft/bottomright": ((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)),
    "bottomleft/topright": ((0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0)),
    # Issue #15: the other quadrant pairs, so every quadrant is asked for beside every other.
    "topright/bottomleft": ((0.0, 0.5, 0.5, 1.0), (0.5, 0.0, 1.0, 0.5)),
    "bottomright/topleft": ((0.5, 0.5, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5)),
    "topleft/topright": ((0.0, 0.0, 0.5, 0.5), (0.0, 0.5, 0.5, 1.0)),
    "bottomright/bottomleft": ((0.5, 0.5, 1.0, 1.0), (0.5, 0.0, 1.0, 0.5)),
    "topleft/bottomleft": ((0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5)),
    "bottomright/topright": ((0.5, 0.5, 1.0, 1.0), (0.0, 0.5, 0.5, 1.0)),
}
# Colour pairs far apart in RGB (yellow/orange and red/orange are the close ones).
OBJECT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red circle", "blue square"),
    ("green triangle", "purple circle"),
    ("yellow square", "blue triangle"),
    ("orange circle", "green square"),
)
TOL = 60.0  # max RGB distance of an object pixel to its palette colour
MIN_FRACTION = 0.01  # fewer matching pixels than this fraction of the image: not generated

_COLOURS = {**{name: np.asarray(rgb, np.float32) for name, rgb in PALETTE.items()},
            "background": np.asarray(BACKGROUND, np.float32)}


def box_mask(box: Box, size: int) -> np.ndarray:
    """[size, size] float mask of a normalised box; pixel centres inside are 1."""
    y0, x0, y1, x1 = box
    c = (np.arange(size) + 0.5) / size
    return ((c[:, None] >= y0) & (c[:, None] < y1) & (c[None, :] >= x0) & (c[None, :] < x1)).astype(np.float32)


def in_box(point: tuple[float, float], box: Box) -> bool:
    (cx, cy), (y0, x0, y1, x1) = point, box
    return x0 <= cx < x1 and y0 <= cy < y1


def detect(image: np.ndarray, colour: str, tol: float = TOL, min_fraction: float = MIN_FRACTION):
    """Centre (cx, cy), normalised, of the pixels of `colour`, or None when too few.

    A pixel is `colour`'s when that is its nearest palette colour (background included)
    and it is within `tol`, so a reddish-orange pixel is not counted for both.
    """
    names = list(_COLOURS)
    ref = np.stack([_COLOURS[n] for n in names])
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - ref[None, None], axis=-1)
    idx = names.index(colour)
    sel = (dist.argmin(-1) == idx) & (dist[..., idx] < tol)
    h, w = sel.shape
    if sel.sum() < max(3, min_fraction * h * w):
        return None
    ys, xs = np.nonzero(sel)
    return float((xs + 0.5).mean() / w), float((ys + 0.5).mean() / h)


def cases(layouts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    return [
        {"layout": name, "prompt": f"a {a} and a {b}", "objects": ((a, LAYOUTS[name][0]), (b, LAYOUTS[name][1]))}
        for name in layouts for a, b in pairs
    ]


def score(images: np.ndarray, case_list: list[dict[str, Any]], num: int) -> dict[str, float]:
    """Counts over images laid out case-major (num per case)."""
    objects = detected = placed = both = 0
    area = []
    for i, img in enumerate(images):
        case = case_list[i // num]
        ok_all = True
        for phrase, box in case["objects"]:
            objects += 1
            area.append((box[2] - box[0]) * (box[3] - box[1]))
            centre = detect(img, phrase.split()[0])
            ok = centre is not None and in_box(centre, box)
            detected += centre is not None
            placed += ok
            ok_all &= ok
        both += ok_all
    return {
        "images": len(images), "objects": objects, "detected": detected,
        "detection_rate": detected / max(objects, 1), "in_region": placed,
        "placement_accuracy": placed / max(detected, 1), "all_placed": both / max(len(images), 1),
        "chance": float(np.mean(area)),
    }


def _smoke_setup():
    """Tiny untrained UNet (16x16) with the builtin encoders: seconds, for tests."""
    import jax

    from ediff_jax.config_utils import base_config
    from ediff_jax.models import build_model
    from ediff_jax.text.conditioning import load_text_encoders

    encoders = load_text_encoders(base_config().text)
    model = build_model(dict(name="unet", channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                             cross_attn_resolutions=(8,), num_heads=2, context_dim=32))
    shapes = jax.eval_shape(encoders.encode, encoders.params, encoders.tokenize(["a red circle"]))
    cond = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32),
                              np.zeros((1,), np.float32), cond)["params"]
    # Random weights from numpy: compiling flax's initialisers takes far longer than this run.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (float(path[-1].key == "scale") + 0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
    return model, encoders, params, {"image_size": 16, "steps": 2, "sampler": "euler", "sigma_data": 0.5,
                                     "guidance": 2.0}


def _workdir_setup(workdir: str):
    from ediff_jax.workdirs import load_workdir

    config, exp, params = load_workdir(workdir)
    settings = {"image_size": int(config.data.image_size), "steps": int(config.sample.steps),
                "sampler": str(config.sample.sampler), "sigma_data": float(config.edm.sigma_data),
                "guidance": float(config.sample.guidance)}
    if getattr(exp, "boundaries", None) is not None:
        settings["boundaries"] = exp.boundaries
    return exp.model, exp.encoders, params, settings


def by_layout(images: np.ndarray, case_list: list[dict[str, Any]], num: int) -> dict[str, float]:
    """Placement accuracy per layout (images are case-major, num per case)."""
    out = {}
    for name in dict.fromkeys(c["layout"] for c in case_list):
        idx = [i for i, c in enumerate(case_list) if c["layout"] == name]
        imgs = np.concatenate([images[i * num:(i + 1) * num] for i in idx])
        out[name] = score(imgs, [case_list[i] for i in idx], num)["placement_accuracy"]
    return out


def write_tables(rows: list[dict[str, Any]], out: Path, header: str, layout_rows: list[dict[str, Any]]) -> None:
    cols = ["pww_weight", "painting", "images", "objects", "detected", "detection_rate", "in_region",
            "placement_accuracy", "all_placed", "chance"]
    with open(out / "placement.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows({c: r[c] for c in cols} for r in rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    names = [k for k in layout_rows[0] if k != "pww_weight"]
    with open(out / "placement_by_layout.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["pww_weight", *names])
        writer.writeheader()
        writer.writerows(layout_rows)
    lines += ["", "Placement accuracy by layout (first object's region / second's):", "",
              "| pww_weight | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in ["pww_weight", *names]) + " |" for r in layout_rows]
    (out / "placement.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="A workdir written by ediff_jax.train (not needed with --smoke).")
    p.add_argument("--num", type=int, default=4, help="Images per (layout, prompt) and w'.")
    p.add_argument("--out", default="experiments/results/pww_placement", help="Output directory.")
    p.add_argument("--pww_weight", "--pww-weight", type=float, nargs="+", default=[0.0, 0.4, 1.0],
                   help="w' values; 0 is plain sampling (no painting).")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the config's).")
    p.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the config's).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="Seconds-long run on a tiny untrained model.")
    args = p.parse_args(argv)
    if not args.smoke and not args.workdir:
        p.error("--workdir is required (or --smoke).")

    from ediff_jax.images import ensure_writable_dir, make_grid, save_png
    from ediff_jax.paint_with_words import pww_cond
    from ediff_jax.sampling import Sampler

    out = ensure_writable_dir(args.out)
    wall, cpu = time.time(), time.process_time()
    model, encoders, params, s = _smoke_setup() if args.smoke else _workdir_setup(args.workdir)
    layouts = args.layouts[:1] if args.smoke else args.layouts
    pairs = OBJECT_PAIRS[:1] if args.smoke else OBJECT_PAIRS
    num = 1 if args.smoke else args.num
    steps = args.steps or s["steps"]
    guidance = s["guidance"] if args.guidance is None else args.guidance
    extra = {"boundaries": s["boundaries"]} if "boundaries" in s else {}
    sampler = Sampler(model, encoders, image_size=s["image_size"], steps=steps, sampler=s["sampler"],
                      sigma_data=s["sigma_data"], **extra)
    case_list = cases(layouts, pairs)
    prompts = [c["prompt"] for c in case_list for _ in range(num)]
    paints = [{phrase: box_mask(box, s["image_size"]) for phrase, box in c["objects"]} for c in case_list]
    paints = [pt for pt in paints for _ in range(num)]
    rows, layout_rows = [], []
    for w in args.pww_weight:
        cond = pww_cond(encoders, prompts, paints, s["image_size"], weight=w)
        images = sampler(params, prompts, guidance=guidance, seed=args.seed, extra_cond=cond)
        rows.append({"pww_weight": w, "painting": "yes" if w > 0 else "no", **score(images, case_list, num)})
        layout_rows.append({"pww_weight": w, **by_layout(images, case_list, num)})
        save_png(make_grid(images, cols=num * len(pairs)), out / f"grid_w{w:g}.png",
                 upscale=max(1, 64 // images.shape[1]))
        print(f"w'={w:g}: placement accuracy {rows[-1]['placement_accuracy']:.3f}, "
              f"detection rate {rows[-1]['detection_rate']:.3f}", flush=True)
    wall, cpu = time.time() - wall, time.process_time() - cpu
    source = "tiny untrained model (--smoke)" if args.smoke else f"`{args.workdir}`"
    header = (f"# Paint-with-words placement accuracy\n\nModel: {source}; {len(case_list)} (layout, prompt) cases x "
              f"{num} seeds = {len(prompts)} images per w'; {steps} {s['sampler']} steps, guidance {guidance:g}, "
              f"seed {args.seed}.\nLayouts: {', '.join(layouts)}. Prompts: "
              f"{'; '.join(f'a {a} and a {b}' for a, b in pairs)}.\n`chance` is the mean painted-region area "
              f"(the accuracy of a centre placed uniformly at random).\nCommand: `python "
              f"{' '.join(['experiments/pww_placement.py', *(argv if argv is not None else sys.argv[1:])])}`. "
              f"Wall {wall:.0f} s, CPU (process) {cpu:.0f} s.")
    write_tables(rows, out, header, layout_rows)
    print(f"Wrote placement.md, placement.csv and grids to {out}.")
    return rows


if __name__ == "__main__":
    main()
