"""Sampling image codes from the transformer: batched, with a key-value cache.

Each new code costs one position's work: the text (and any primed codes) are run once
to fill the cache, then every step feeds only the code just sampled. With
`cond_scale` != 1 the batch is doubled with text-dropped copies and the logits are
mixed as uncond + cond_scale * (cond - uncond) (classifier-free guidance; train with
`transformer.cond_drop_prob` > 0 for it to mean anything).

Threads. A cached step is small (one position per row), and on CPU the cost of spreading each of its
few dozen small operations over OpenMP threads can exceed the work: every operation ends in a barrier,
and when the cores are shared with other processes one late thread stalls it. Below
`SMALL_STEP_FLOPS` per step the steps run on one thread. At the tiny configuration of
benchmarks/bench_models.py (8 rows, width 256, 4 layers) on 2 cores shared with other work that is 5-6 ms
per code instead of 90-300 ms; on idle cores it is about 20% slower than two threads (4-5 ms per code).
The codes do not depend on the thread count (tests/test_transformer.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from dalle.models.transformer import TEXT_PAD, DalleTransformer


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, and outside the smallest set whose probability exceeds top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p; the first always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _as_batch(tokens: torch.Tensor | Sequence, name: str, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(tokens, device=device).long()
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2:
        raise ValueError(f"{name} must have shape (length,) or (prompts, length), got {tuple(tensor.shape)}")
    return tensor


@torch.no_grad()
def generate(
    model: DalleTransformer,
    text_tokens: torch.Tensor | Sequence,
    num_images: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cond_scale: float = 1.0,
    seed: int = 0,
    prime_codes: torch.Tensor | Sequence | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Image codes (prompts * num_images, grid * grid) for text tokens (T,) or (prompts, T).

    Samples of one prompt are consecutive rows. `prime_codes` (n,) or (prompts, n) fixes the
    first n codes in raster order (the top rows of an image) and the model completes the rest.
    The same seed gives the same codes.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no cut), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if cond_scale != 1.0 and model.cfg.cond_drop_prob == 0:
        raise ValueError(
            f"cond_scale={cond_scale} (classifier-free guidance) needs a transformer trained with "
            "transformer.cond_drop_prob > 0; this one never saw a caption dropped, so its uncaptioned "
            "predictions mean nothing. Sample with cond_scale 1, or retrain with cond_drop_prob 0.1"
        )
    device = model.text_head.weight.device
    text = _as_batch(text_tokens, "text_tokens", device)
    prompts = text.shape[0]
    if prompts == 0:
        raise ValueError("no prompts: text_tokens has no rows")
    model.prepare_text(text)  # validates shape and range
    codes = torch.zeros(prompts, 0, dtype=torch.long, device=device)
    if prime_codes is not None:
        codes = _as_batch(prime_codes, "prime_codes", device)
        if codes.shape[0] not in (1, prompts):
            raise ValueError(f"prime_codes has {codes.shape[0]} rows for {prompts} prompts")
        codes = codes.expand(prompts, -1)
        model.check_codes(codes)
        if codes.shape[1] >= model.num_codes:
            raise ValueError(
                f"prime_codes must leave something to sample: got {codes.shape[1]} of {model.num_codes}"
            )
    text = text.repeat_interleave(num_images, dim=0)
    codes = codes.repeat_interleave(num_images, dim=0)
    guided = cond_scale != 1.0
    if guided:
        text = torch.cat([text, torch.full_like(text, TEXT_PAD)])
        codes = torch.cat([codes, codes])

    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    # Every code lands in its column of one preallocated tensor; the primed ones are there already.
    out = torch.empty(codes.shape[0], model.num_codes, dtype=torch.long, device=device)
    out[:, : codes.shape[1]] = codes
    threads = _step_threads(model, text.shape[0], device) if use_cache else contextlib.nullcontext()
    try:
        with threads:
            step = _cached_steps(model, text, codes) if use_cache else _uncached_steps(model, text, codes)
            logits = next(step)
            for index in range(codes.shape[1], model.num_codes):
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + cond_scale * (cond - uncond)
                new = _sample(logits.float(), temperature, top_k, top_p, generator)
                if guided:
                    new = torch.cat([new, new])
                out[:, index] = new
                if index + 1 < model.num_codes:
                    logits = step.send(new)
    finally:
        model.train(was_training)
    return out[: out.shape[0] // 2] if guided else out


# Below this many floating-point operations per cached step (all layers, all rows), steps run on one
# CPU thread; see the module's docstring.
SMALL_STEP_FLOPS = 1e8


@contextlib.contextmanager
def _step_threads(model: DalleTransformer, rows: int, device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU while the cached steps are small; the caller's setting otherwise."""
    step_flops = 2 * rows * sum(p.numel() for p in model.blocks.parameters())
    before = torch.get_num_threads()
    if device.type != "cpu" or step_flops >= SMALL_STEP_FLOPS or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sample(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _cached_steps(model: DalleTransformer, text: torch.Tensor, codes: torch.Tensor):
    """Yield the next code's logits; receive the code sampled, feed only that position."""
    cache = model.new_cache()
    x = torch.cat([model.embed_text(model.prepare_text(text)), model.embed_codes(codes)], dim=1)
    hidden = model.backbone(x, 0, cache)
    while True:
        new = yield model.image_logits(hidden[:, -1])
        index = cache.length - model.text_len - 1  # raster index of the code just sampled
        hidden = model.backbone(model.embed_codes(new[:, None], index), cache.length, cache)


def _uncached_steps(model: DalleTransformer, text: torch.Tensor, codes: torch.Tensor):
    """The reference: recompute the whole prefix for every new code."""
    prepared = model.prepare_text(text)
    while True:
        x = torch.cat([model.embed_text(prepared), model.embed_codes(codes)], dim=1)
        new = yield model.image_logits(model.backbone(x)[:, -1])
        codes = torch.cat([codes, new[:, None]], dim=1)
