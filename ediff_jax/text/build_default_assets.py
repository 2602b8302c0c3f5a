"""Build the shipped text encoders: ``ediff_jax/assets/text/{t5_shapes_v2,clip_shapes_v2}``.

No pretrained T5 or CLIP can be downloaded here, so the defaults are trained here, with their real
objectives, on the caption language of the ``ediff_shapes`` dataset:

* tokenizers trained on the captions (sentencepiece unigram for T5, with span-corruption
  sentinels; CLIP's byte-level BPE);
* T5: our Flax ``T5Encoder`` pretrained by span corruption with a small decoder used only for
  pretraining (``pretrain/t5_pretrain.py``);
* CLIP: our Flax text tower trained contrastively with a small vision tower on rendered scenes,
  with hard negative captions (``pretrain/clip_contrastive.py``);
* each saved in Hugging Face layout (``pretrain/export.py``) with a ``pretraining.json`` report:
  the settings, the learning curve, the held-out metrics, the linear binding probe beside the same
  encoder at random initialisation, the CPU time, and the weights' sha256 (checked at load).

``python -m ediff_jax.text.build_default_assets [--out DIR]`` prints its CPU time at the end. The
run is seeded; on one machine it is repeatable, across machines float summation order may differ.

``builtin:t5_shapes`` and ``builtin:clip_shapes`` are the frozen, randomly initialised encoders of
earlier versions, kept byte for byte so that workdirs trained with them still sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import random
import shutil
import string
import tempfile
import time
from collections.abc import Sequence
from typing import Any

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("to the left of", "to the right of", "above", "below")

CORPUS_SIZE = 4000
SEED = 0
MODEL_MAX_LENGTH = 77  # CLIP's position table; callers pad/truncate to a shorter max_length (32)
# Characters every tokenizer must know so that prompts outside the templates degrade gracefully.
REQUIRED_CHARS = string.ascii_lowercase + string.digits + ".,'-"
# Printable ASCII minus space (CLIP splits on whitespace); byte-level BPE maps these to themselves.
CLIP_ALPHABET = [chr(c) for c in range(33, 127)]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "assets" / "text"
T5_NAME, CLIP_NAME = "t5_shapes_v2", "clip_shapes_v2"
T5_SENTINELS = 8  # span corruption of 3-12-token captions needs at most a few sentinels
# Half the tokens in spans of about 2: T5's 0.15 / 3 hides about one word of a short caption, which
# the decoder refills from the template alone, and left the encoder binding worse than at its
# initialisation (the sweep is in BENCHMARKS.md).
T5_NOISE_DENSITY, T5_MEAN_SPAN = 0.5, 2.0
# Scenes whose captions train the encoders, and the disjoint ones that measure them.
TRAIN_SCENES_SEED, HELD_OUT_SEED = 1, 2


def caption_corpus(size: int = CORPUS_SIZE, seed: int = SEED) -> list[str]:
    """Captions drawn uniformly over the four templates of the procedural dataset (lower case)."""
    rng = random.Random(seed)
    captions = []
    for _ in range(size):
        template = rng.randrange(4)
        first = f"a {rng.choice(COLORS)} {rng.choice(SHAPES)}"
        if template == 0:
            captions.append(first)
        elif template == 1:
            captions.append(f"{first} in the {rng.choice(REGIONS)}")
        elif template == 2:
            captions.append(f"{first} {rng.choice(RELATIONS)} a {rng.choice(COLORS)} {rng.choice(SHAPES)}")
        else:
            captions.append(f"{first} and a {rng.choice(COLORS)} {rng.choice(SHAPES)}")
    return captions


# ----------------------------------------------------------------------------------------------
# T5: sentencepiece unigram + T5EncoderModel


def train_t5_tokenizer(corpus: Sequence[str], extra_ids: int = T5_SENTINELS):
    """Sentencepiece unigram (pad=0, eos=1, unk=2 as T5) wrapped as a transformers T5 tokenizer,
    with ``extra_ids`` span-corruption sentinels ``<extra_id_0..>`` at the end of the vocabulary."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5TokenizerFast

    # Each distinct word is also fed on its own line: sentencepiece only seeds substrings that are
    # left-maximal repeats, and in our captions every colour word follows "a ", so without this the
    # unigram model would never consider whole words like "▁red".
    words = sorted({w for caption in corpus for w in caption.split()})
    proto = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        # A lower-casing rule instead of nmt_nfkc: its precompiled charsmap alone would be ~300 KB of
        # tokenizer.json, and lower-casing maps "Red Circle" onto known pieces instead of <unk>.
        rule = pathlib.Path(tmp) / "lowercase.tsv"
        rule.write_text("".join(f"{ord(u):X}\t{ord(u.lower()):X}\n" for u in string.ascii_uppercase))
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([*corpus, *words]),
            model_writer=proto,
            model_type="unigram",
            vocab_size=96,
            hard_vocab_limit=False,  # the toy language supports fewer pieces; take what it has
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            required_chars=REQUIRED_CHARS,
            normalization_rule_tsv=str(rule),
            num_threads=1,
            minloglevel=2,
        )
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto.getvalue())
    return T5TokenizerFast(
        vocab=[(piece.piece, piece.score) for piece in model.pieces],
        extra_ids=extra_ids,
        _spm_precompiled_charsmap=model.normalizer_spec.precompiled_charsmap,
        model_max_length=MODEL_MAX_LENGTH,
    )


# ----------------------------------------------------------------------------------------------
# CLIP: byte-level BPE with </w> + CLIPTextModelWithProjection


def train_clip_bpe(corpus: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP-layout vocab (alphabet, alphabet+``</w>``, merges, then bos/eos) and merges, trained with
    the exact normaliser/pre-tokeniser CLIPTokenizer uses so the merges apply identically."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizerFast

    reference = CLIPTokenizerFast().backend_tokenizer
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = reference.normalizer
    bpe.pre_tokenizer = reference.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=10_000,  # never reached: merge until every corpus word is one token
        min_frequency=1,
        initial_alphabet=CLIP_ALPHABET,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    raw_merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in raw_merges]

    tokens = [*CLIP_ALPHABET, *(c + "</w>" for c in CLIP_ALPHABET)]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


# ----------------------------------------------------------------------------------------------


_KEEP = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "pretraining.json",
}


def _reset(out_dir: pathlib.Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def _prune(out_dir: pathlib.Path) -> None:
    """Drop whatever save_pretrained writes beyond what the loaders read (e.g. generation configs)."""
    for path in out_dir.iterdir():
        if path.name not in _KEEP:
            shutil.rmtree(path) if path.is_dir() else path.unlink()




# ----------------------------------------------------------------------------------------------
# Training and shipping


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """The recipe of the shipped encoders (the CLI can shorten the runs for a smoke test)."""

    t5_steps: int = 2000
    t5_batch: int = 128
    t5_lr: float = 3e-3
    t5_decoder_layers: int = 1
    clip_steps: int = 1500
    clip_batch: int = 128
    train_captions: int = 20_000
    held_out_captions: int = 2_000
    retrieval_scenes: int = 1_000


def t5_encoder_config(vocab_size: int):
    from ediff_jax.text.t5 import T5EncoderConfig

    return T5EncoderConfig(
        vocab_size=vocab_size, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
        feed_forward_proj="gated-gelu",
    )


def clip_text_config(vocab_size: int, eos_token_id: int):
    from ediff_jax.text.clip import CLIPTextEncoderConfig

    return CLIPTextEncoderConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="quick_gelu", eos_token_id=eos_token_id,
        projection_dim=64,
    )


def scene_captions(count: int, seed: int) -> list[str]:
    """Captions as the dataset writes them (every template), of ``count`` fresh scenes."""
    import numpy as np

    from ediff_jax.data.shapes import caption_scene, sample_scene

    rng = np.random.default_rng(seed)
    return [caption_scene(sample_scene(rng), rng) for _ in range(count)]


class _HiddenStates:
    """A CLIP text tower seen as ``apply(...) -> hidden states``, the probe's encoder interface."""

    def __init__(self, module: Any):
        self.module = module

    def apply(self, variables: Any, ids: Any, mask: Any) -> Any:
        return self.module.apply(variables, ids, mask)[0]


def _binding_probes(module: Any, params: Any, random_params: Any, tokenizer: Any,
                    captions: list[str]) -> dict[str, Any]:
    """The linear binding probe on the trained encoder, the same encoder at its initialisation,
    and a bag of words; probe train and validation captions share no caption string."""
    from ediff_jax.text.pretrain.probe import bag_of_words_features, probe_binding, split_by_caption, t5_features_fn

    train, val = split_by_caption(captions, val_fraction=0.25, seed=SEED)
    return {
        "trained": probe_binding(t5_features_fn(module, params, tokenizer), train, val),
        "random_init": probe_binding(t5_features_fn(module, random_params, tokenizer), train, val),
        "bag_of_words": probe_binding(bag_of_words_features, train, val),
    }


def build_t5(out_dir: pathlib.Path, corpus: Sequence[str], settings: BuildSettings,
             train: list[str], held_out: list[str]) -> dict[str, Any]:
    from ediff_jax.text.pretrain.export import export_t5_encoder
    from ediff_jax.text.pretrain.t5_pretrain import (
        initial_encoder_params,
        pretrain_t5_encoder,
        span_reconstruction_accuracy,
    )
    from ediff_jax.text.t5 import T5Encoder

    tokenizer = train_t5_tokenizer(corpus)
    config = t5_encoder_config(len(tokenizer))
    result = pretrain_t5_encoder(
        config, tokenizer, train, steps=settings.t5_steps, batch_size=settings.t5_batch, seed=SEED,
        lr=settings.t5_lr, decoder_layers=settings.t5_decoder_layers,
        noise_density=T5_NOISE_DENSITY, mean_noise_span_length=T5_MEAN_SPAN,
    )
    # The best any model can score needs a reference sample that covers the held-out strings.
    reference = scene_captions(10 * len(train), HELD_OUT_SEED + 1)
    reconstruction = span_reconstruction_accuracy(
        config, result.encoder_params, result.decoder_params, tokenizer, held_out, seed=HELD_OUT_SEED,
        noise_density=T5_NOISE_DENSITY, mean_noise_span_length=T5_MEAN_SPAN, reference_captions=reference,
    )
    probes = _binding_probes(T5Encoder(config), result.encoder_params, initial_encoder_params(config, SEED),
                             tokenizer, train + held_out)
    _reset(out_dir)
    export_t5_encoder(out_dir, config, result.encoder_params, tokenizer.pad_token_id, tokenizer.eos_token_id)
    tokenizer.save_pretrained(out_dir)
    return {
        "objective": f"T5 span corruption (noise density {T5_NOISE_DENSITY}, mean span {T5_MEAN_SPAN}), "
                     "small decoder used only for pretraining",
        "settings": {"steps": settings.t5_steps, "batch_size": settings.t5_batch, "lr": settings.t5_lr,
                     "decoder_layers": settings.t5_decoder_layers, "train_captions": len(train)},
        "history": result.history,
        "held_out_span_reconstruction": reconstruction,
        "binding_probe": probes,
    }


def build_clip(out_dir: pathlib.Path, corpus: Sequence[str], settings: BuildSettings,
               train: list[str], held_out: list[str]) -> dict[str, Any]:
    import jax
    from transformers import CLIPTokenizerFast

    from ediff_jax.text.pretrain.clip_contrastive import ContrastiveSettings, retrieval_accuracy, train_clip
    from ediff_jax.text.pretrain.export import export_clip_text_encoder

    vocab, merges = train_clip_bpe(corpus)
    _reset(out_dir)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=MODEL_MAX_LENGTH,
    )
    config = clip_text_config(len(vocab), vocab[EOS])
    contrastive = ContrastiveSettings(steps=settings.clip_steps, batch_size=settings.clip_batch, seed=SEED)
    model, params, history = train_clip(config, tokenizer, contrastive)
    retrieval = retrieval_accuracy(model, params, tokenizer, contrastive, num_scenes=settings.retrieval_scenes,
                                   seed=HELD_OUT_SEED)
    random_params = model.init(jax.random.PRNGKey(SEED), contrastive.text_length, contrastive.init_temperature)
    probes = _binding_probes(_HiddenStates(model.text), params["text"], random_params["text"], tokenizer,
                             train + held_out)
    export_clip_text_encoder(out_dir, config, params["text"], vocab[BOS], vocab[EOS])
    tokenizer.save_pretrained(out_dir)
    return {
        "objective": "CLIP InfoNCE with a learned temperature against a small vision tower (dropped after "
                     "training), with hard negative captions",
        "settings": {**dataclasses.asdict(contrastive), "vision_tower": dataclasses.asdict(model.vision.config)},
        "history": history,
        "held_out_retrieval": retrieval,
        "binding_probe": probes,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT,
        help=f"parent directory of {T5_NAME}/ and {CLIP_NAME}/ (default: the package's assets)",
    )
    parser.add_argument("--only", choices=("t5", "clip"), default=None, help="rebuild one encoder only")
    defaults = BuildSettings()
    for field in dataclasses.fields(BuildSettings):
        parser.add_argument(f"--{field.name}", type=field.type if isinstance(field.type, type) else
                            type(getattr(defaults, field.name)), default=getattr(defaults, field.name),
                            help=f"default {getattr(defaults, field.name)}")
    args = parser.parse_args(argv)
    settings = BuildSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildSettings)})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from ediff_jax.text.loading import PRETRAINING_REPORT, weights_fingerprint

    corpus = caption_corpus()
    train = scene_captions(settings.train_captions, TRAIN_SCENES_SEED)
    held_out = scene_captions(settings.held_out_captions, HELD_OUT_SEED)
    total_cpu, total_wall = time.process_time(), time.perf_counter()
    for name, build in ((T5_NAME, build_t5), (CLIP_NAME, build_clip)):
        if args.only and not name.startswith(args.only):
            continue
        out_dir = args.out / name
        cpu, wall = time.process_time(), time.perf_counter()
        report = build(out_dir, corpus, settings, train, held_out)
        _prune(out_dir)
        report["cpu_seconds"] = round(time.process_time() - cpu, 1)
        report["wall_seconds"] = round(time.perf_counter() - wall, 1)
        report["weights_sha256"] = weights_fingerprint(out_dir)
        (out_dir / PRETRAINING_REPORT).write_text(json.dumps(report, indent=1) + "\n")
        for path in out_dir.iterdir():
            path.chmod(0o644)  # the package data must be world-readable
        size = sum(p.stat().st_size for p in out_dir.iterdir())
        print(f"wrote {out_dir} ({size / 1024:.0f} KiB) in {report['wall_seconds'] / 60:.1f} min wall, "
              f"{report['cpu_seconds'] / 60:.1f} CPU-min")
    print(f"total: {(time.perf_counter() - total_wall) / 60:.1f} min wall, "
          f"{(time.process_time() - total_cpu) / 60:.1f} CPU-min (all threads), on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
