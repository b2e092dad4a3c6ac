"""The gallery of one transformer checkpoint: prompts sampled, reranked by the run's CLIP, completions, eval."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import torch

from dalle.config import RunConfig, config_from_dict
from dalle.runroot import (
    EVAL_PROMPTS,
    EVAL_REPORT,
    GALLERY_SUMMARY,
    SHARDS_DIR,
    checkpoint_step,
    gallery_dir,
    run_config,
    split_checkpoint_uri,
)
from dalle.sample.evaluation import load_evaluator
from dalle.sample.generate import generate
from dalle.sample.page import Completion, GalleryPage, Section, write_gallery_page
from dalle.sample.rerank import SamplingSettings, decode_codes, encode_prompts
from dalle.sample.sampler import Sampler
from dalle.storage import Storage
from dalle.tokens.loader import read_listed_shard, read_manifest


def sampling_settings(cfg: RunConfig) -> SamplingSettings:
    g = cfg.gallery
    return SamplingSettings(
        num_samples=g.samples_per_prompt,
        top=g.top,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        cond_scale=g.cond_scale,
        batch_size=g.batch_size,
        seed=g.seed,
        relation_weight=g.relation_weight,
        binding_weight=g.binding_weight,
    )


def draw_section(
    title: str, key: str, prompts: list[str], sampler: Sampler, settings: SamplingSettings
) -> Section:
    """Every prompt's samples, reranked by the sampler's CLIP, as one gallery section."""
    return Section(title, [sampler.sample(p, settings) for p in prompts], top=settings.top, key=key)


def with_sampling(cfg: RunConfig, origin: str, **changes) -> RunConfig:
    """`cfg` with gallery keys changed (None keeps a key), validated: a bad value raises a
    ConfigError that names the key and `origin`."""
    data = cfg.model_dump(mode="json")
    data["gallery"].update({key: value for key, value in changes.items() if value is not None})
    return config_from_dict(data, origin=origin)


def user_prompts(cfg: RunConfig) -> list[str]:
    if not cfg.gallery.prompts_file:
        return []
    location = cfg.gallery.prompts_file
    folder, _, name = location.rpartition("/")
    text = Storage(folder or ".").read_bytes(name).decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def draw_gallery(
    storage: Storage,
    cfg: RunConfig,
    checkpoint_rel: str,
    log: Callable[[str], None] = print,
    on_progress: Callable[[int, int], None] | None = None,
) -> str:
    """Sample, rerank and write the gallery of the transformer at `checkpoint_rel`; returns the page URI.
    The evaluator plug-in of gallery.evaluator, when set, adds its sections and figures.
    `on_progress(done, total)` follows the prompt sections drawn."""
    sampler = Sampler.from_run(storage, cfg, checkpoint_rel)
    transformer, dvae, tokenizer = sampler.transformer, sampler.dvae, sampler.tokenizer
    evaluator = load_evaluator(cfg)
    step = checkpoint_step(checkpoint_rel)
    settings = sampling_settings(cfg)
    manifest = read_manifest(storage, SHARDS_DIR)
    last_shard = read_listed_shard(
        storage, SHARDS_DIR, manifest["shards"][-1], columns=["caption", "image_codes"]
    )

    prompt_groups: list[tuple[str, str, list[str]]] = []  # (title, eval group, prompts)
    metadata = getattr(evaluator, "prompt_metadata", None)
    if metadata is not None:
        storage.write_bytes(EVAL_PROMPTS, metadata().encode())
    if evaluator is not None:
        prompt_groups += [
            (title, key, prompts) for key, title, prompts in evaluator.prompt_groups() if prompts
        ]
    captions = list(dict.fromkeys(last_shard.column("caption").to_pylist()))[: cfg.gallery.validation_prompts]
    if captions:
        prompt_groups.append(("Captions from the data", "", captions))
    extra = user_prompts(cfg)
    if extra:
        prompt_groups.append(("Your prompts", "", extra))

    sections = []
    for index, (title, key, prompts) in enumerate(prompt_groups):
        if on_progress is not None:
            on_progress(index, len(prompt_groups) + 1)  # + 1: the completions
        log(f"gallery step {step}: sampling {len(prompts)} prompts x {settings.num_samples} ({title})")
        sections.append(draw_section(title, key, prompts, sampler, settings))
    if on_progress is not None:
        on_progress(len(prompt_groups), len(prompt_groups) + 1)

    completions = []
    rows = cfg.gallery.completion_rows or max(1, transformer.grid // 2)
    rows = min(rows, transformer.grid - 1)
    for index in range(min(cfg.gallery.completions, last_shard.num_rows)):
        caption = last_shard.column("caption")[index].as_py()
        codes = torch.tensor(last_shard.column("image_codes")[index].as_py(), dtype=torch.long)
        text = encode_prompts(tokenizer, [caption], transformer.text_len)
        completed = generate(
            transformer,
            text,
            num_images=cfg.gallery.completion_samples,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            cond_scale=settings.cond_scale,
            seed=settings.seed + index,
            prime_codes=codes[: rows * transformer.grid],
        )
        original = decode_codes(dvae, codes[None])[0]
        completions.append(Completion(caption, original, decode_codes(dvae, completed), rows))

    if on_progress is not None:
        on_progress(len(prompt_groups) + 1, len(prompt_groups) + 1)
    evaluation = evaluator.evaluate(sections, sampler.clip) if evaluator is not None else None
    sampling = settings.described()
    if evaluation:
        storage.write_json(
            EVAL_REPORT,
            {**evaluation, "step": step, "checkpoint": storage.uri(checkpoint_rel), "sampling": sampling},
        )
    page = GalleryPage(
        step,
        storage.uri(checkpoint_rel),
        sections,
        completions,
        evaluation,
        sampling,
        cfg.fingerprint("gallery"),
    )
    return write_gallery_page(storage, page)


def gallery_is_current(storage: Storage, cfg: RunConfig, step: int) -> bool:
    """Whether the gallery of transformer checkpoint `step` exists, drawn with `cfg`'s gallery settings."""
    summary = f"{gallery_dir(step)}/{GALLERY_SUMMARY}"
    if not storage.exists(summary):
        return False
    return storage.read_json(summary).get("settings_fingerprint") == cfg.fingerprint("gallery")


def sample_to_folder(
    checkpoint: str, prompt: str, num: int, top: int, out: str, seed: int = 0, **changes
) -> list[str]:
    """Draw `num` images for `prompt` from a transformer checkpoint, keep the CLIP-best `top` in `out`
    (PNG files and scores.json); returns what was written, one line each. `changes` are gallery
    sampling keys (temperature, top_k, top_p, cond_scale) in place of the run's."""
    root, rel = split_checkpoint_uri(checkpoint)
    storage = Storage(root)
    cfg = with_sampling(
        run_config(storage), "the sample command", samples_per_prompt=num, top=top, seed=seed, **changes
    )
    sampler = Sampler.from_run(storage, cfg, rel)
    settings = sampling_settings(cfg)
    samples = sampler.sample(prompt, settings)
    target = Storage(out)
    written, scores = [], []
    for rank, index in enumerate(samples.ranking[:top]):
        buffer = io.BytesIO()
        samples.images[index].save(buffer, format="PNG")
        written.append(target.write_bytes(f"sample_{rank:02d}.png", buffer.getvalue()))
        entry = {"file": f"sample_{rank:02d}.png", "rank": rank, "clip_score": float(samples.scores[index])}
        if samples.relation_margins is not None:
            entry["relation_margin"] = float(samples.relation_margins[index])
        if samples.binding_margins is not None:
            entry["binding_margin"] = float(samples.binding_margins[index])
        scores.append(entry)
    meta_out = {
        "prompt": prompt,
        "checkpoint": checkpoint,
        "samples": num,
        "reranked_by": sampler.clip.identity if sampler.clip else None,
        "sampling": settings.described(),
    }
    written.append(
        target.write_bytes("scores.json", json.dumps({**meta_out, "images": scores}, indent=2).encode())
    )
    return written
