"""Pretraining of the shipped text encoders on ``ediff_shapes`` captions (built by
``python -m ediff_jax.text.build_default_assets``). One job per file:

- ``captions``: true captions, truth of a caption for a scene, hard negatives;
- ``clip_contrastive``: CLIP text tower + small vision tower, InfoNCE with hard negatives, retrieval;
- ``span_corruption``: T5's span corruption (noise masks, sentinels, batches);
- ``t5_pretrain``: the T5 encoder with a pretraining-only decoder, and span reconstruction;
- ``probe``: a linear probe of colour/shape/relation binding for any text encoder;
- ``export``: Flax params -> Hugging Face model directories.
"""
