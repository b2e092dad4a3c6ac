"""The transformer over [text ; image codes] and sampling from it with a key-value cache."""

from __future__ import annotations

import math

import pytest
import torch

from dalle.config import ConfigError, TransformerConfig, config_from_dict
from dalle.models.transformer import DalleTransformer, attention_mask
from dalle.sample.generate import filter_logits, generate

TEXT_LEN, TEXT_VOCAB, GRID, CODEBOOK = 6, 40, 4, 24


def tiny(attention="full", seed=0, **overrides) -> DalleTransformer:
    cfg = TransformerConfig(
        text_seq_len=TEXT_LEN,
        width=32,
        depth=len(attention) if isinstance(attention, list) else 4 if attention == "paper" else 2,
        heads=2,
        attention=attention,
        conv_kernel=3,
        **overrides,
    )
    torch.manual_seed(seed)
    return DalleTransformer(cfg, text_vocab_size=TEXT_VOCAB, image_vocab_size=CODEBOOK, image_grid=GRID)


def batch(size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, TEXT_VOCAB, (size, TEXT_LEN), generator=g)
    text[:, 4:] = 0  # padding
    codes = torch.randint(0, CODEBOOK, (size, GRID * GRID), generator=g)
    return text, codes


# ----- masks ------------------------------------------------------------------------------


def expected_mask(kind: str, text_len: int, grid: int, kernel: int) -> list[list[bool]]:
    """The paper's masks written out one element at a time (Figure 11, appendix B.1)."""
    n = text_len + grid * grid - 1
    rows = []
    for p in range(n):
        row = []
        for q in range(n):
            if q > p:
                allowed = False
            elif p < text_len or q < text_len:  # text is causal; image sees all text
                allowed = True
            else:
                i, j = p - text_len, q - text_len
                (ri, ci), (rj, cj) = divmod(i, grid), divmod(j, grid)
                allowed = {
                    "full": True,
                    "row": i - j <= grid,
                    "column": ci == cj,
                    "conv": ri - rj <= kernel // 2 and abs(ci - cj) <= kernel // 2,
                }[kind]
            row.append(allowed)
        rows.append(row)
    return rows


@pytest.mark.parametrize("kind", ["full", "row", "column", "conv"])
def test_masks_match_the_paper_element_by_element(kind):
    mask = attention_mask(kind, text_len=7, grid=4, conv_kernel=3)
    assert mask.tolist() == expected_mask(kind, 7, 4, 3)


def test_row_and_column_masks_on_the_papers_4x4_example():
    # Figure 11 with 6 text tokens: image token 8 (1-based, last of the second row) attends
    # tokens 4-8 under row attention and 4 and 8 under column attention.
    text_len = 6

    def seen(kind):
        mask = attention_mask(kind, text_len, grid=4)
        return [j + 1 for j in range(15) if mask[text_len + 7, text_len + j]]

    assert seen("row") == [4, 5, 6, 7, 8]
    assert seen("column") == [4, 8]


def test_paper_layer_pattern():
    kinds = TransformerConfig(depth=10, attention="paper").layer_attention()
    assert kinds == ["row", "column", "row", "row", "row", "column", "row", "row", "row", "conv"]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"attention": ["full", "diagonal"], "depth": 2}, "unknown attention kind"),
        ({"attention": ["full"], "depth": 2}, "attention lists 1 layers but depth is 2"),
        ({"width": 30, "heads": 4}, "not divisible by heads"),
    ],
)
def test_bad_transformer_config_is_named(section, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"transformer": section})


# ----- separate vocabularies ------------------------------------------------------------


def test_text_positions_predict_text_and_image_positions_predict_codes():
    model = tiny()
    text, codes = batch()
    text_logits, image_logits = model.logits(text, codes)
    assert text_logits.shape == (4, TEXT_LEN, TEXT_VOCAB + TEXT_LEN)  # vocabulary + per-position padding
    assert image_logits.shape == (4, GRID * GRID, CODEBOOK)

    # Each head feeds only its own positions: changing one leaves the other's logits as they were.
    with torch.no_grad():
        model.text_head.weight.add_(1.0)
    text_after, image_after = model.logits(text, codes)
    assert torch.equal(image_after, image_logits)
    assert not torch.allclose(text_after, text_logits)

    # And the image loss sends no gradient into the text head.
    model.zero_grad()
    torch.nn.functional.cross_entropy(image_after.flatten(0, 1), codes.flatten()).backward()
    assert model.text_head.weight.grad is None or not model.text_head.weight.grad.any()
    assert model.image_head.weight.grad.abs().sum() > 0


def test_sampled_codes_are_image_codes_even_when_text_vocabulary_is_larger():
    model = tiny()
    text, _ = batch(2)
    codes = generate(model, text, num_images=3, temperature=2.0, seed=1)
    assert codes.shape == (6, GRID * GRID)
    assert codes.min() >= 0 and codes.max() < CODEBOOK


def test_each_padding_position_has_its_own_token():
    model = tiny()
    text = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    prepared = model.prepare_text(text)[0].tolist()
    assert prepared == [TEXT_VOCAB + i for i in range(TEXT_LEN)]
    text[0, 0] = 7
    assert model.prepare_text(text)[0, 0] == 7


def test_loss_weights_text_and_image():
    model = tiny(text_loss_weight=0.125)
    text, codes = batch()
    out = model(text, codes)
    assert out.loss.item() == pytest.approx(
        0.125 * out.text_loss.item() + 0.875 * out.image_loss.item(), rel=1e-5
    )


def test_bad_tokens_and_codes_are_named():
    model = tiny()
    text, codes = batch()
    with pytest.raises(ValueError, match="text tokens must lie in \\[0, 40\\)"):
        model(text + TEXT_VOCAB, codes)
    with pytest.raises(ValueError, match="image codes must lie in \\[0, 24\\)"):
        model(text, codes + CODEBOOK)
    with pytest.raises(ValueError, match="shape \\(batch, 6\\)"):
        model(text[:, :3], codes)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        generate(model, text, top_k=-1)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, text[:0])
    # A (batch, grid, grid) code tensor, as the dVAE's encode returns it, is the same as flat codes.
    assert model(text, codes.view(4, GRID, GRID)).loss.item() == pytest.approx(model(text, codes).loss.item())


# ----- sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "paper", ["conv", "column", "row", "full"]])
def test_cached_sampling_equals_uncached(attention):
    model = tiny(attention, cond_drop_prob=0.1)  # trained-for-guidance, so cond_scale may be set
    text, codes = batch(2)
    kwargs = {"num_images": 2, "temperature": 1.0, "top_k": 10, "top_p": 0.95, "seed": 7}
    cached = generate(model, text, **kwargs)
    uncached = generate(model, text, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    guided = {**kwargs, "cond_scale": 3.0, "prime_codes": codes[:, :GRID]}
    assert torch.equal(generate(model, text, **guided), generate(model, text, use_cache=False, **guided))


@pytest.mark.parametrize("attention", ["full", "paper"])
def test_cache_gives_the_full_forward_pass_one_position_at_a_time(attention):
    model = tiny(attention).eval()
    text, codes = batch(3)
    _, image_logits = model.logits(text, codes)
    cache = model.new_cache()
    hidden = model.backbone(model.embed_text(model.prepare_text(text)), 0, cache)
    stepwise = [model.image_logits(hidden[:, -1])]
    for index in range(GRID * GRID - 1):
        hidden = model.backbone(model.embed_codes(codes[:, index : index + 1], index), cache.length, cache)
        stepwise.append(model.image_logits(hidden[:, -1]))
    torch.testing.assert_close(torch.stack(stepwise, dim=1), image_logits, atol=1e-5, rtol=1e-4)


def test_sampling_is_deterministic_for_a_seed():
    model = tiny()
    text, _ = batch(2)
    first = generate(model, text, num_images=2, seed=3)
    assert torch.equal(first, generate(model, text, num_images=2, seed=3))
    assert not torch.equal(first, generate(model, text, num_images=2, seed=4))


def test_priming_keeps_the_given_top_rows():
    model = tiny()
    text, codes = batch(2)
    prime = codes[:, : 2 * GRID]
    out = generate(model, text, num_images=3, prime_codes=prime, seed=0)
    assert torch.equal(out[:, : 2 * GRID], prime.repeat_interleave(3, dim=0))
    with pytest.raises(ValueError, match="leave something to sample"):
        generate(model, text, prime_codes=codes)


def test_greedy_sampling_takes_the_argmax():
    model = tiny()
    text, _ = batch(1)
    codes = generate(model, text, temperature=0)
    _, image_logits = model.logits(text, codes)
    assert torch.equal(image_logits.argmax(-1), codes)


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = torch.isfinite(filter_logits(logits, top_p=float(probs[0] + 0.01))).tolist()
    assert kept == [[True, True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum() == 1


# ----- training behaviour -------------------------------------------------------------------


@pytest.mark.learning
def test_a_tiny_transformer_overfits_one_batch(learning_seed):
    model = tiny(seed=learning_seed)
    text, codes = batch(4, seed=learning_seed)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    for _ in range(250):
        out = model(text, codes)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    # The first text token follows BOS alone, so over 4 distinct captions it costs ln(4) at best.
    assert out.image_loss < 0.05 and out.text_loss < math.log(4) / TEXT_LEN + 0.05, out
    # What it memorised comes back out: greedy sampling reproduces the batch's codes.
    assert torch.equal(generate(model, text, temperature=0), codes)


def test_dropped_text_makes_the_image_loss_independent_of_the_caption():
    model = tiny(cond_drop_prob=0.999).train()
    text, codes = batch()
    torch.manual_seed(1)
    first = model(text, codes).image_loss.item()
    torch.manual_seed(1)
    assert model(torch.randint(1, TEXT_VOCAB, text.shape), codes).image_loss.item() == pytest.approx(
        first, abs=1e-6
    )


def test_activation_checkpointing_gives_the_same_gradients():
    text, codes = batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny("paper", checkpoint_activations=checkpointing).train()
        model(text, codes).loss.backward()
        grads.append(model.blocks[0].attention.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_trains():
    model = tiny("paper")
    text, codes = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(text, codes)
        sampled = generate(model, text[:1], top_k=5)  # the cache takes the dtype autocast computes in
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert sampled.shape == (1, GRID * GRID)


def test_weight_decay_only_on_linear_weights():
    model = tiny()
    decay, no_decay = model.optimizer_groups(0.045)
    assert decay["weight_decay"] == 0.045 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(
        name.endswith("weight")
        and "norm" not in name
        and "embedding" not in name
        and "image_row" not in name
        and "position" not in name
        for name in names
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert not decayed & {id(p) for p in no_decay["params"]}


@pytest.mark.parametrize("knob", ["dropout", "attention_dropout"])
def test_each_dropout_acts_in_training_only(knob):
    model = tiny(**{knob: 0.5})
    text, codes = batch()
    model.train()
    torch.manual_seed(1)
    first = model(text, codes).loss
    assert not torch.equal(first, model(text, codes).loss)  # a new mask each pass
    model.eval()
    assert torch.equal(model(text, codes).loss, model(text, codes).loss)
    assert not torch.equal(first, model(text, codes).loss)


def test_guidance_needs_a_model_trained_with_captions_dropped():
    text, _ = batch(1)
    with pytest.raises(ValueError, match="cond_drop_prob > 0"):
        generate(tiny(), text, cond_scale=2.0)
    assert generate(tiny(cond_drop_prob=0.1), text, cond_scale=2.0).shape == (1, GRID * GRID)


def test_small_sampling_steps_run_on_one_cpu_thread_and_the_setting_comes_back(monkeypatch):
    import dalle.sample.generate as generation

    model = tiny()
    text, _ = batch(2)
    threads_seen = []
    cached_steps = generation._cached_steps

    def watched(*args):
        threads_seen.append(torch.get_num_threads())
        yield from cached_steps(*args)

    monkeypatch.setattr(generation, "_cached_steps", watched)
    before = torch.get_num_threads()
    codes = generate(model, text, top_k=10, seed=3)
    assert torch.get_num_threads() == before
    assert threads_seen == [1]
    monkeypatch.setattr(generation, "SMALL_STEP_FLOPS", 0.0)  # never small: the caller's threads
    assert torch.equal(generate(model, text, top_k=10, seed=3), codes)
    assert threads_seen == [1, before]


def test_model_flops_per_sample_match_the_counted_matrix_products():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny()
    text, codes = batch(2)
    with FlopCounterMode(display=False) as counter:
        model(text, codes).loss.backward()
    counted = counter.get_total_flops() / 2
    # The counter sees the causal attention as half the work the usual MFU convention counts.
    assert 0.85 * model.flops_per_sample() <= counted <= model.flops_per_sample()
