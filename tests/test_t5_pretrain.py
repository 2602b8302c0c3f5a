"""Span-corruption pretraining of the T5 encoder (ediff_jax/text/pretrain) and the binding probe."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax.data.shapes import COLORS, RELATIONS, SHAPES, caption_scene, sample_scene
from ediff_jax.text.pretrain import probe
from ediff_jax.text.pretrain import span_corruption as sc
from ediff_jax.text.pretrain import t5_pretrain as tp
from ediff_jax.text.t5 import T5Encoder, T5EncoderConfig

SENTINELS = [100 + i for i in range(8)]


def _runs(mask: np.ndarray, cyclic: bool = False) -> int:
    """Number of maximal runs of True (on a ring if ``cyclic``)."""
    starts = mask & ~np.roll(mask, 1) if cyclic else sc.span_starts(mask)
    return int(starts.sum()) if not (cyclic and mask.all()) else 1


def _captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [caption_scene(sample_scene(rng), rng) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    """The builtin T5 tokenizer, with 8 sentinels appended (<extra_id_0> lowest) if it has none."""
    from ediff_jax.text.build_default_assets import caption_corpus, train_t5_tokenizer

    tok = train_t5_tokenizer(caption_corpus())
    if tok.convert_tokens_to_ids("<extra_id_0>") in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(8)]})
    return tok


def _tiny_config(tokenizer, **kw) -> T5EncoderConfig:
    base = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                feed_forward_proj="gated-gelu")
    return T5EncoderConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------
# Span corruption


def test_noise_mask_counts_and_layout_follow_t5():
    """Unrolled masks have round(L*d) noise tokens clipped to [1, L-1], in max(1, round(n/3)) spans,
    start with non-noise and end with noise (T5's layout); rolling keeps the counts on the ring."""
    rng = np.random.default_rng(0)
    for length, density in itertools.product(range(2, 41), (0.15, 0.3, 0.5)):
        noise = min(max(int(np.round(length * density)), 1), length - 1)
        spans = max(int(np.round(noise / 3.0)), 1)
        for _ in range(3):
            mask = sc.random_spans_noise_mask(length, density, 3.0, rng)
            assert mask.shape == (length,) and mask.dtype == bool
            assert mask.sum() == noise, (length, density)
            assert _runs(mask) == spans, (length, density)
            assert not mask[0] and mask[-1]
            rolled = sc.random_spans_noise_mask(length, density, 3.0, rng, random_roll=True)
            assert rolled.sum() == noise and _runs(rolled, cyclic=True) == spans


def test_noise_mask_matches_t5_reference_outputs():
    """T5's TF implementation gives exactly 26 zeros then 4 ones for length 30 at density 0.15
    (one span; 4 = round(4.5) half to even), and 5 noise tokens in 2 spans for length 31."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        assert "".join(map(str, sc.random_spans_noise_mask(30, 0.15, 3.0, rng).astype(int))) == "0" * 26 + "1" * 4
        mask = sc.random_spans_noise_mask(31, 0.15, 3.0, rng)
        assert mask.sum() == 5 and _runs(mask) == 2 and mask[-1]


def test_span_lengths_are_a_uniform_random_partition():
    """6 noise tokens in 2 spans: the 5 compositions (1+5 .. 5+1) are equally likely, as T5's shuffle
    of segment starts gives (a wrong sampler, e.g. i.i.d. lengths, skews this)."""
    rng = np.random.default_rng(2)
    firsts = []
    for _ in range(4000):
        mask = sc.random_spans_noise_mask(20, 0.3, 3.0, rng)
        start = int(np.argmax(mask))
        firsts.append(int(np.argmin(mask[start:])))  # length of the first noise span
    freq = np.bincount(firsts, minlength=6)[1:] / len(firsts)
    np.testing.assert_allclose(freq, 0.2, atol=0.03)


@pytest.mark.parametrize("length,density,roll", [(20, 0.3, False), (10, 0.5, True)])
def test_noise_mask_sampler_matches_the_enumerated_law(length, density, roll):
    """The sampler's empirical law is the exact one: uniform over cut points (and roll offsets)."""
    law = sc.noise_mask_distribution(length, density, 3.0, roll)
    assert abs(sum(law.values()) - 1) < 1e-9
    rng = np.random.default_rng(15)
    n = 6000
    counts: dict[tuple[bool, ...], int] = {}
    for _ in range(n):
        key = tuple(sc.random_spans_noise_mask(length, density, 3.0, rng, roll).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(law)
    total_variation = 0.5 * sum(abs(law[k] - counts.get(k, 0) / n) for k in law)
    assert total_variation < 0.06, total_variation


def test_random_roll_spreads_the_noise_over_all_positions():
    """On a 6-token caption the single noise token is at the end without roll (T5's default), and at
    every position about equally often with it."""
    rng = np.random.default_rng(3)
    fixed = {int(np.argmax(sc.random_spans_noise_mask(6, 0.15, 3.0, rng))) for _ in range(50)}
    assert fixed == {5}
    positions = [int(np.argmax(sc.random_spans_noise_mask(6, 0.15, 3.0, rng, True))) for _ in range(3000)]
    np.testing.assert_allclose(np.bincount(positions, minlength=6) / 3000, 1 / 6, atol=0.03)


def test_apply_noise_mask_on_a_known_example():
    """Each noise span becomes one sentinel, in order; targets are each sentinel then its tokens."""
    ids = np.arange(10, 16)
    mask = np.array([0, 1, 1, 0, 0, 1], bool)
    inputs, targets = sc.apply_noise_mask(ids, mask, SENTINELS)
    np.testing.assert_array_equal(inputs, [10, 100, 13, 14, 101])
    np.testing.assert_array_equal(targets, [100, 11, 12, 101, 15])
    # A mask that starts with noise (possible after a roll) still pairs sentinel i with span i.
    inputs, targets = sc.apply_noise_mask(ids, np.array([1, 0, 0, 1, 1, 0], bool), SENTINELS)
    np.testing.assert_array_equal(inputs, [100, 11, 12, 101, 15])
    np.testing.assert_array_equal(targets, [100, 10, 101, 13, 14])


def test_corrupt_spans_round_trip_and_sentinel_order():
    """Interleaving inputs and targets by sentinel restores the ids exactly; sentinels appear as
    sentinel_ids[0], [1], ... in both, one per noise span."""
    rng = np.random.default_rng(4)
    for length in (1, 2, 3, 7, 10, 25, 60):
        for density in (0.15, 0.4):
            for roll in (False, True):
                ids = rng.integers(3, 60, length)
                inputs, targets = sc.corrupt_spans(ids, SENTINELS, rng, density, 3.0, roll)
                np.testing.assert_array_equal(sc.uncorrupt(inputs, targets, SENTINELS), ids)
                in_sent = [t for t in inputs.tolist() if t in SENTINELS]
                out_sent = [t for t in targets.tolist() if t in SENTINELS]
                assert in_sent == out_sent == SENTINELS[: len(in_sent)]
                assert len(targets) - len(out_sent) == len(ids) - (len(inputs) - len(in_sent))
                if length > 1:
                    assert targets[0] == SENTINELS[0] and len(in_sent) >= 1


def test_caption_span_batch_layout(tokenizer):
    """Padded batch: EOS closes inputs and targets, masks cover exactly the real tokens, decoder
    inputs are the targets shifted right after start token 0, and the batch decodes to the captions."""
    captions = _captions(64, 5)
    ids = sc.tokenize_captions(tokenizer, captions)
    in_len, tgt_len = sc.span_lengths_for(ids, 0.15, 3.0)
    batch = sc.caption_span_batch(tokenizer, captions, np.random.default_rng(6), in_len, tgt_len)
    sentinels = sc.sentinel_ids_of(tokenizer, 8)
    assert batch.input_ids.shape == (64, in_len) and batch.target_ids.shape == (64, tgt_len)
    np.testing.assert_array_equal(batch.decoder_input_ids[:, 0], 0)
    np.testing.assert_array_equal(batch.decoder_input_ids[:, 1:], batch.target_ids[:, :-1])
    eos = tokenizer.eos_token_id
    for row in range(64):
        n_in, n_tgt = batch.attention_mask[row].sum(), batch.target_mask[row].sum()
        np.testing.assert_array_equal(batch.attention_mask[row], np.arange(in_len) < n_in)
        np.testing.assert_array_equal(batch.target_mask[row], np.arange(tgt_len) < n_tgt)
        assert batch.input_ids[row, n_in - 1] == eos and batch.target_ids[row, n_tgt - 1] == eos
        assert (batch.input_ids[row, n_in:] == 0).all() and (batch.target_ids[row, n_tgt:] == 0).all()
        restored = sc.uncorrupt(batch.input_ids[row, : n_in - 1], batch.target_ids[row, : n_tgt - 1], sentinels)
        np.testing.assert_array_equal(restored, ids[row])


def test_sentinel_ids_are_required(tokenizer):
    """A tokenizer without <extra_id_*> is refused instead of silently using <unk> as sentinel."""

    class NoSentinels:
        unk_token_id = 2

        def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
            return [2 for _ in tokens]

    with pytest.raises(ValueError, match="sentinel"):
        sc.sentinel_ids_of(NoSentinels(), 2)
    ids = sc.sentinel_ids_of(tokenizer, 8)
    assert len(set(ids)) == 8 and tokenizer.convert_ids_to_tokens(ids) == [f"<extra_id_{i}>" for i in range(8)]


# ------------------------------------------------------------------------------------------------
# Model


def _decoder_setup(tokenizer, layers: int = 2, tied: bool = False):
    cfg = _tiny_config(tokenizer)
    decoder = tp.T5SpanDecoder(tp.decoder_config_for(cfg, layers), tied)
    params = tp.init_span_model(cfg, decoder, jax.random.key(0), 9, 7)
    return cfg, decoder, params


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_is_causal_and_ignores_encoder_padding(tokenizer, tied):
    """Changing decoder token t changes logits at t and later only; changing an encoder token
    under the padding mask changes nothing."""
    cfg, decoder, params = _decoder_setup(tokenizer, tied=tied)
    rng = np.random.default_rng(0)
    inp = rng.integers(3, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[:, 6:] = 0
    dec = rng.integers(3, cfg.vocab_size, (2, 7)).astype(np.int32)
    logits = lambda i, d: np.asarray(tp.span_logits(T5Encoder(cfg), decoder, params, i, mask, d))  # noqa: E731
    base = logits(inp, dec)
    changed = dec.copy()
    changed[:, 4] = (changed[:, 4] + 1 - 3) % (cfg.vocab_size - 3) + 3
    out = logits(inp, changed)
    np.testing.assert_allclose(out[:, :4], base[:, :4], atol=1e-6)
    assert np.abs(out[:, 4:] - base[:, 4:]).max() > 1e-3
    padded = inp.copy()
    padded[:, 7] = (padded[:, 7] + 5 - 3) % (cfg.vocab_size - 3) + 3
    np.testing.assert_allclose(logits(padded, dec), base, atol=1e-6)
    unpadded = inp.copy()
    unpadded[:, 2] = (unpadded[:, 2] + 5 - 3) % (cfg.vocab_size - 3) + 3
    assert np.abs(logits(unpadded, dec) - base).max() > 1e-3


def test_t5_init_scales(tokenizer):
    """T5's scheme, not Flax's defaults: embedding std 1, q std (d*d_kv)^-0.5 (it carries the missing
    1/sqrt(d_kv)), k/v d^-0.5, wo d_ff^-0.5, relative bias d^-0.5, norm scales 1."""
    cfg = _tiny_config(tokenizer, d_model=64, d_kv=16, d_ff=256)
    decoder = tp.T5SpanDecoder(tp.decoder_config_for(cfg, 1))
    params = tp.init_span_model(cfg, decoder, jax.random.key(1), 8, 8)
    enc, dec = params["encoder"], params["decoder"]
    d, d_kv = 64, 16
    checks = [
        (enc["shared"]["embedding"], 1.0),
        (enc["block_0"]["attention"]["q"]["kernel"], (d * d_kv) ** -0.5),
        (enc["block_1"]["attention"]["k"]["kernel"], d**-0.5),
        (enc["block_0"]["ff"]["wo"]["kernel"], 256**-0.5),
        (enc["block_0"]["attention"]["relative_attention_bias"]["embedding"], d**-0.5),
        (dec["block_0"]["cross_attention"]["q"]["kernel"], (d * d_kv) ** -0.5),
        (dec["lm_head"]["kernel"], d**-0.5),
    ]
    for value, std in checks:
        assert abs(float(jnp.std(value)) / std - 1) < 0.15, (value.shape, float(jnp.std(value)), std)
    np.testing.assert_array_equal(enc["final_layer_norm"]["weight"], 1.0)
    np.testing.assert_array_equal(dec["block_0"]["cross_attn_norm"]["weight"], 1.0)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny encoder pretrained for 60 steps, and the captions it saw."""
    cfg = _tiny_config(tokenizer)
    captions = _captions(400, 7)
    result = tp.pretrain_t5_encoder(cfg, tokenizer, captions, steps=60, batch_size=32, seed=0, lr=3e-3, log_every=20)
    return cfg, captions, result


def test_pretrained_encoder_has_exactly_the_t5encoder_tree(tokenizer, trained):
    """The shipped params have the structure, shapes and dtypes of T5Encoder(cfg).init, so they
    export to HF names unchanged; the history is logged every log_every steps."""
    cfg, _, result = trained
    reference = T5Encoder(cfg).init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert jax.tree.structure(result.encoder_params) == jax.tree.structure(reference)
    assert shapes(result.encoder_params) == shapes(reference)
    assert [h["step"] for h in result.history] == [20, 40, 60]


def test_pretraining_reduces_loss_on_a_fixed_batch(tokenizer, trained):
    """60 steps lower the span loss of a fixed held-out batch well below that of the same seed's
    initial parameters."""
    cfg, captions, result = trained
    decoder = tp.decoder_from_params(cfg, result.decoder_params)
    assert decoder.config.num_layers == 1 and not decoder.tied_lm_head
    ids = sc.tokenize_captions(tokenizer, captions)
    density, span = tp.NOISE_DENSITY, tp.MEAN_NOISE_SPAN_LENGTH
    in_len, tgt_len = sc.span_lengths_for(ids, density, span)
    batch = sc.caption_span_batch(
        tokenizer, _captions(128, 8), np.random.default_rng(9), in_len, tgt_len, density, span
    )
    arrays = {k: jnp.asarray(v) for k, v in vars(batch).items()}
    initial = tp.init_span_model(cfg, decoder, jax.random.key(0), in_len, tgt_len)
    for x, y in zip(jax.tree.leaves(initial["encoder"]), jax.tree.leaves(tp.initial_encoder_params(cfg, 0))):
        np.testing.assert_array_equal(x, y)  # the documented random-init baseline is the real start
    trained_params = {"encoder": result.encoder_params, "decoder": result.decoder_params}
    before = float(tp.span_loss(T5Encoder(cfg), decoder, initial, arrays))
    after = float(tp.span_loss(T5Encoder(cfg), decoder, trained_params, arrays))
    assert after < 0.5 * before, (before, after)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_pretraining_is_deterministic_given_the_seed(tokenizer):
    """Same seed -> identical parameters; another seed -> different ones."""
    cfg = _tiny_config(tokenizer, num_layers=1)
    captions = _captions(50, 10)
    run = lambda seed: tp.pretrain_t5_encoder(cfg, tokenizer, captions, steps=3, batch_size=8, seed=seed)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    for x, y in zip(jax.tree.leaves(a.encoder_params), jax.tree.leaves(b.encoder_params)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a.encoder_params), jax.tree.leaves(c.encoder_params)))


def test_token_categories_follow_the_caption_words(tokenizer):
    """Every token is labelled by its word: colour, shape, spatial word or template word."""
    cats = tp.token_categories(tokenizer, ["a red circle in the top left", "a blue square below a green triangle"])
    names = [[tp.CATEGORIES[i] for i in row] for row in cats]
    assert names[0] == ["template", "color", "shape", "template", "template", "spatial", "spatial"]
    assert names[1] == ["template", "color", "shape", "spatial", "template", "color", "shape"]


def test_span_reconstruction_report(tokenizer, trained):
    """Counts add up to the target tokens; sentinels and template words are learnt first; a caption
    distribution with one caption is fully predictable by the lookup-table reference."""
    cfg, captions, result = trained
    held_out = _captions(200, 11)
    report = tp.span_reconstruction_accuracy(
        cfg, result.encoder_params, result.decoder_params, tokenizer, held_out, seed=0, reference_captions=held_out
    )
    counts = sum(report[f"count_{c}"] for c in tp.CATEGORIES)
    assert report["count_eos"] == 200 and report["count_sentinel"] >= 200 and counts > 400
    assert report["accuracy_sentinel"] > 0.6 and report["accuracy_template"] > report["accuracy_color"]
    assert 0 <= report["exact_match"] <= report["token_accuracy"] <= 1
    assert report["bayes_accuracy_template"] > 0.95
    single = tp.span_reconstruction_accuracy(
        cfg, result.encoder_params, result.decoder_params, tokenizer, ["a red circle and a blue square"] * 20,
        seed=0, reference_captions=["a red circle and a blue square"],
    )
    assert single["bayes_token_accuracy"] == 1.0


# ------------------------------------------------------------------------------------------------
# Probe


def _code(captions: list[str]) -> np.ndarray:
    """Features that encode every target linearly (one-hot per target) plus noise."""
    kept, labels = probe.binding_labels(captions)
    assert kept == captions
    vocab = {"a_color": COLORS, "a_shape": SHAPES, "b_color": COLORS, "b_shape": SHAPES,
             "relation": (*RELATIONS, probe.NO_RELATION)}
    x = np.concatenate(
        [np.eye(len(vocab[t]))[[vocab[t].index(v) for v in labels[t]]] for t in probe.TARGETS], axis=1
    )
    return x + 0.1 * np.random.default_rng(len(captions)).normal(size=x.shape)


def test_probe_reads_a_linear_code_and_not_noise():
    """Synthetic features with a known linear code are read at ~100%; random features at chance;
    a bag of words reads the relation but not which colour belongs to which object."""
    train, val = _captions(1500, 12), _captions(600, 13)
    coded = probe.probe_binding(_code, train, val)
    for target in probe.TARGETS:
        assert coded[target] > 0.98, (target, coded)
    noise = probe.probe_binding(lambda c: np.random.default_rng(len(c)).normal(size=(len(c), 32)), train, val)
    assert abs(noise["mean"] - noise["chance_mean"]) < 0.08, noise
    assert 0.1 < noise["chance_a_color"] < 0.26 and 0.4 < noise["chance_relation"] < 0.65
    bow = probe.probe_binding(probe.bag_of_words_features, train, val)
    assert bow["relation"] > 0.98 and bow["a_color"] < 0.65 and bow["b_color"] < 0.65


def test_split_by_caption_shares_no_string():
    """No validation caption string occurs in training; every caption lands in one split."""
    captions = _captions(800, 14)
    train, val = probe.split_by_caption(captions, 0.2, seed=0)
    assert not set(train) & set(val) and len(train) + len(val) == len(captions) and val
