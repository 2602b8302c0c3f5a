"""Build the embedded default text encoders: ``ediff_jax/assets/text/{t5_shapes,clip_shapes}``.

There is no pretrained T5 or CLIP in this project, so the defaults are tokenizers trained on the
caption language of the procedural shapes dataset plus tiny, seeded, randomly initialised encoders
saved in Hugging Face layout. Going through transformers' own classes and ``save_pretrained`` means
the defaults exercise exactly the loaders used for real checkpoints (T5-XXL, CLIP-L).

Deterministic: ``python -m ediff_jax.text.build_default_assets [--out DIR]`` rewrites byte-identical
weights (tokenizer JSON may differ only if the installed tokenizers/transformers versions change).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import random
import shutil
import string
import tempfile
from collections.abc import Sequence

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


def train_t5_tokenizer(corpus: Sequence[str]):
    """Sentencepiece unigram (pad=0, eos=1, unk=2 as T5) wrapped as a transformers T5 tokenizer."""
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
        extra_ids=0,  # no span-corruption sentinels: the encoder is only used for conditioning
        _spm_precompiled_charsmap=model.normalizer_spec.precompiled_charsmap,
        model_max_length=MODEL_MAX_LENGTH,
    )


def build_t5(out_dir: pathlib.Path, corpus: Sequence[str]) -> None:
    import torch
    from transformers import T5Config, T5EncoderModel

    tokenizer = train_t5_tokenizer(corpus)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        num_heads=4,
        d_ff=128,
        num_layers=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = T5EncoderModel(config).eval()
    _reset(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


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


def build_clip(out_dir: pathlib.Path, corpus: Sequence[str]) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizerFast

    vocab, merges = train_clip_bpe(corpus)
    _reset(out_dir)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=MODEL_MAX_LENGTH
    )
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=64,
        hidden_act="quick_gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    torch.manual_seed(SEED)
    model = CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------


_KEEP = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help="parent directory of t5_shapes/ and clip_shapes/"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    corpus = caption_corpus()
    for name, build in (("t5_shapes", build_t5), ("clip_shapes", build_clip)):
        out_dir = args.out / name
        build(out_dir, corpus)
        _prune(out_dir)
        for path in out_dir.iterdir():
            path.chmod(0o644)  # save_pretrained writes 0600 weights; the package data must be world-readable
        size = sum(p.stat().st_size for p in out_dir.iterdir())
        print(f"wrote {out_dir} ({size / 1024:.0f} KiB): {sorted(p.name for p in out_dir.iterdir())}")


if __name__ == "__main__":
    main()
