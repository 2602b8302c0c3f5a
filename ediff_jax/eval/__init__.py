"""Evaluation: distribution distances, ediff_shapes prompt alignment and CLIP score.

- ``frechet``: Fréchet distance and KID for any JAX feature function (no Inception here).
- ``features``: a feature network trained on ediff_shapes, shipped in ``assets/eval``
  (``train_features`` retrains it; ``degradations`` are its blur/noise negatives).
- ``prompts`` / ``segmentation`` / ``alignment``: pixel-only scoring of images against their
  ediff_shapes prompts (colour, shape, region, relation).
- ``clip_vision`` / ``clip_loading`` / ``clip_score``: CLIP score with user-supplied HF weights.

Importing this package never imports TensorFlow (only ``train_features`` reads the dataset).
"""

from ediff_jax.eval.alignment import (
    AlignmentResult,
    aggregate_alignment,
    relation_holds,
    score_alignment,
    score_alignment_batch,
)
from ediff_jax.eval.clip_loading import (
    CLIPImagePreprocessing,
    load_clip_preprocessing,
    load_clip_vision_encoder,
)
from ediff_jax.eval.clip_score import CLIPScorer, clip_preprocess, clip_score, clip_score_from_embeddings
from ediff_jax.eval.clip_vision import CLIPVisionEncoder, CLIPVisionEncoderConfig
from ediff_jax.eval.features import (
    DEFAULT_FEATURE_WEIGHTS,
    FeatureNetConfig,
    ShapesFeatureNet,
    load_differentiable_feature_fn,
    load_feature_fn,
    load_feature_weights,
    save_feature_weights,
)
from ediff_jax.eval.frechet import (
    KIDResult,
    compute_features,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    kid,
)
from ediff_jax.eval.prompts import ExpectedObject, ParsedPrompt, parse_prompt
from ediff_jax.eval.segmentation import DetectedObject, detect_objects

__all__ = [
    "AlignmentResult",
    "CLIPImagePreprocessing",
    "CLIPScorer",
    "CLIPVisionEncoder",
    "CLIPVisionEncoderConfig",
    "DEFAULT_FEATURE_WEIGHTS",
    "DetectedObject",
    "ExpectedObject",
    "FeatureNetConfig",
    "KIDResult",
    "ParsedPrompt",
    "ShapesFeatureNet",
    "aggregate_alignment",
    "clip_preprocess",
    "clip_score",
    "clip_score_from_embeddings",
    "compute_features",
    "detect_objects",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_stats",
    "kid",
    "load_clip_preprocessing",
    "load_clip_vision_encoder",
    "load_differentiable_feature_fn",
    "load_feature_fn",
    "load_feature_weights",
    "parse_prompt",
    "relation_holds",
    "save_feature_weights",
    "score_alignment",
    "score_alignment_batch",
]
