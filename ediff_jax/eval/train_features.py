"""Train the shipped ``ediff_shapes`` feature network (``ediff_jax/assets/eval``).

    nice python -m ediff_jax.eval.train_features --out ediff_jax/assets/eval/shapes_features.msgpack

Reads ``ediff_shapes/32`` through TFDS (prepared on first use; TensorFlow is imported only
here, so ``ediff_jax.eval`` stays TF-free), derives per-colour targets from the ``objects``
feature (the shape of the object of each palette colour or "absent", and its 3x3 region or
"absent"), blurs and/or noises about half of every batch (``degradations``) for the
clean-vs-degraded head, trains with Adam and reports validation accuracies, which are stored in
the file's metadata. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ediff_jax.data.shapes import COLORS, REGIONS, region_of
from ediff_jax.eval.degradations import degrade_batch
from ediff_jax.eval.features import (
    DEFAULT_FEATURE_WEIGHTS,
    REGION_CLASSES,
    SHAPE_CLASSES,
    FeatureNetConfig,
    ShapesFeatureNet,
    save_feature_weights,
)

DATASET = "ediff_shapes/32"


def object_labels(colors: Sequence[int], shapes: Sequence[int], bboxes: np.ndarray) -> np.ndarray:
    """int32 [colours, 2] of one scene from its TFDS ``objects`` (class ids, bboxes): per palette
    colour, the index into ``SHAPE_CLASSES`` and into ``REGION_CLASSES`` (0 = absent)."""
    labels = np.zeros((len(COLORS), 2), np.int32)
    for color, shape, (ymin, xmin, ymax, xmax) in zip(colors, shapes, np.asarray(bboxes)):
        labels[int(color), 0] = 1 + int(shape)
        labels[int(color), 1] = 1 + REGIONS.index(region_of((xmin + xmax) / 2, (ymin + ymax) / 2))
    return labels


def load_split(split: str, data_dir: str | None = None, dataset: str = DATASET) -> tuple[np.ndarray, np.ndarray]:
    """All ``(images uint8 [N, H, W, 3], labels int32 [N, colours, 2])`` of a split, in file order."""
    import tensorflow_datasets as tfds  # TF only when the dataset is read

    from ediff_jax.data import pipeline

    builder = pipeline.prepare(pipeline.get_dataset_builder(dataset, data_dir))
    images, labels = [], []
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        objects = example["objects"]
        images.append(example["image"])
        labels.append(object_labels(objects["color"], objects["shape"], objects["bbox"]))
    return np.stack(images), np.stack(labels)


def _loss(
    params: Any, module: ShapesFeatureNet, images: jax.Array, labels: jax.Array, is_clean: jax.Array
) -> jax.Array:
    """Shape and region cross-entropies (mean over colours) plus the clean-vs-degraded one.

    Degraded images keep their scene labels: blur and noise neither move nor recolour objects.
    (Training the scene heads on clean images only was tried: the shapes got 4 points better,
    but the network then failed to learn to detect noise, which FD must see.)
    """
    _, logits, clean_logit = module.apply({"params": params}, images)
    n_shape = len(SHAPE_CLASSES)
    shape_loss = optax.softmax_cross_entropy_with_integer_labels(logits[..., :n_shape], labels[..., 0])
    region_loss = optax.softmax_cross_entropy_with_integer_labels(logits[..., n_shape:], labels[..., 1])
    clean_loss = optax.sigmoid_binary_cross_entropy(clean_logit, is_clean.astype(jnp.float32))
    return (shape_loss + region_loss).mean() + clean_loss.mean()


def train(
    images: np.ndarray,
    labels: np.ndarray,
    config: FeatureNetConfig = FeatureNetConfig(),
    steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    log_every: int = 100,
) -> tuple[Any, list[float]]:
    """Adam with cosine decay on shuffled epochs, about half of each batch degraded on the fly;
    returns ``(params, per-step losses)``."""
    module = ShapesFeatureNet(config)
    params = module.init(jax.random.PRNGKey(seed), jnp.asarray(images[:1]))["params"]
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, key, batch_images, batch_labels):
        batch_images, is_clean = degrade_batch(key, batch_images)
        loss, grads = jax.value_and_grad(_loss)(params, module, batch_images, batch_labels, is_clean)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    degrade_key = jax.random.PRNGKey(seed + 1)
    order = np.empty(0, np.int64)
    losses = []
    start = time.time()
    for i in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(images))])
        batch, order = order[:batch_size], order[batch_size:]
        key = jax.random.fold_in(degrade_key, i)
        params, opt_state, loss = step(params, opt_state, key, images[batch], labels[batch])
        losses.append(float(loss))
        if log_every and (i + 1) % log_every == 0:
            recent = np.mean(losses[-log_every:])
            print(f"step {i + 1}/{steps}  loss {recent:.4f}  {time.time() - start:.0f}s", flush=True)
    return params, losses


def evaluate(module: ShapesFeatureNet, params: Any, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Held-out accuracy of the heads: scene labels per image (every colour right) and per present
    object on the clean images, and clean-vs-degraded on a seeded, half-degraded copy."""
    heads = jax.jit(lambda p, x: module.apply({"params": p}, x)[1:])
    apply = lambda x: heads(params, x)  # noqa: E731
    outputs = [apply(images[i : i + 500]) for i in range(0, len(images), 500)]
    logits = np.concatenate([np.asarray(o[0]) for o in outputs])
    degraded, is_clean = degrade_batch(jax.random.PRNGKey(12345), jnp.asarray(images))
    clean_logit = np.concatenate(
        [np.asarray(apply(degraded[i : i + 500])[1]) for i in range(0, len(images), 500)]
    )
    n_shape = len(SHAPE_CLASSES)
    predicted = np.stack([logits[..., :n_shape].argmax(-1), logits[..., n_shape:].argmax(-1)], axis=-1)
    correct = predicted == labels  # [N, colours, 2]
    present = labels[..., 0] > 0
    return {
        "scene_exact_accuracy": float(np.mean(np.all(correct, axis=(1, 2)))),
        "scene_color_shape_accuracy": float(np.mean(np.all(correct[..., 0], axis=1))),
        "scene_color_region_accuracy": float(np.mean(np.all(correct[..., 1], axis=1))),
        "object_shape_accuracy": float(np.mean(correct[..., 0][present])),
        "object_region_accuracy": float(np.mean(correct[..., 1][present])),
        "clean_vs_degraded_accuracy": float(np.mean((clean_logit > 0) == np.asarray(is_clean))),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_FEATURE_WEIGHTS), help="msgpack file to write")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir (default: TFDS's)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_images, train_labels = load_split("train", args.data_dir)
    val_images, val_labels = load_split("validation", args.data_dir)
    print(f"train {train_images.shape}, validation {val_images.shape}", flush=True)
    config = FeatureNetConfig()
    start = time.time()
    params, losses = train(
        train_images, train_labels, config, args.steps, args.batch_size, args.learning_rate, args.seed
    )
    metrics = evaluate(ShapesFeatureNet(config), params, val_images, val_labels)
    print({k: round(v, 4) for k, v in metrics.items()}, flush=True)
    metadata = {
        "dataset": DATASET,
        "shape_classes": list(SHAPE_CLASSES),
        "region_classes": list(REGION_CLASSES),
        "colors": list(COLORS),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "final_train_loss": float(np.mean(losses[-100:])),
        "train_seconds": round(time.time() - start, 1),
        **{f"validation_{k}": v for k, v in metrics.items()},
    }
    save_feature_weights(args.out, config, params, metadata)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
