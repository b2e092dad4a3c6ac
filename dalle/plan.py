"""`dalle plan`: what a run of N pairs costs, stage by stage, before anyone starts it.

Storage per stage, crawl node-hours, CLIP embedding GPU-hours, the dedup index's memory and time,
tokenize GPU-hours and transformer GPU-days, computed from the run configuration's model shapes
and from throughputs. Every throughput says where it comes from (`Basis`): measured here by a
benchmark of this repository, published by the project that makes the tool, computed from our
own model code (FLOPs), or assumed (a parameter the user should set for their data and hardware).
The figures in THROUGHPUTS are one place: docs/scaling.md and the benchmarks' JSON lines agree
with them, and `--set name=value` replaces any of them for a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from dalle.config import RunConfig
from dalle.errors import UserError

MEASURED = "measured here"  # by a benchmark of this repository, on the 2-core CPU machine named
PUBLISHED = "published"  # by the tool's own project
COMPUTED = "computed"  # from our model code and the configuration (FLOPs, parameters)
ASSUMED = "assumed"  # a property of the data or the hardware: set it for yours with --set


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    basis: str
    source: str


THROUGHPUTS: dict[str, Figure] = {
    "crawl_urls_per_node_s": Figure(
        1390.0, "URLs/s per crawl node", PUBLISHED,
        "img2dataset's README: 100M URLs in 20 h on one machine (16 cores, fast DNS resolver)",
    ),
    "download_success": Figure(
        0.6, "share of URLs that download", ASSUMED,
        "web lists lose links with age; measure yours on a sample (reports/curate.json: downloaded/input_rows)",
    ),
    "kept_after_curation": Figure(
        0.7, "share of downloads kept", ASSUMED,
        "rule filters, CLIP-score cut and dedup; the demo keeps 0.97, LAION's 0.28 CLIP cut keeps far fewer",
    ),
    "image_bytes": Figure(
        25_000.0, "bytes per stored image", ASSUMED, "a 256 px JPEG as img2dataset's default resize writes",
    ),
    "url_row_bytes": Figure(150.0, "bytes per URL-list row", ASSUMED, "a URL and a caption, compressed"),
    "decode_images_per_core_s": Figure(
        580.0, "images/s per CPU core (decode and resize for CLIP)", MEASURED,
        "a 256 px JPEG decoded and preprocessed by PIL on one idle core of a 2-core AMD EPYC "
        "(benchmarks/bench_embed.py)",
    ),
    "cpu_cores_per_gpu": Figure(12.0, "CPU cores per GPU", ASSUMED, "a typical 8-GPU node has 96-128 cores"),
    "gpu_peak_flops": Figure(
        989e12, "FLOP/s (bf16 dense) per GPU", PUBLISHED, "NVIDIA's H100 SXM / H200 datasheet",
    ),
    "mfu_train": Figure(
        0.40, "model FLOPs utilisation in training", ASSUMED,
        "the goal for bf16 training on an H100-class GPU; not yet measured on one",
    ),
    "mfu_inference": Figure(
        0.25, "model FLOPs utilisation of batched inference (CLIP, dVAE encoder)", ASSUMED,
        "large-batch convolution and ViT inference in bf16; not yet measured on a GPU",
    ),
    "dedup_s_per_million": Figure(
        98.5, "seconds per shard of 1M vectors on 2 cores", MEASURED,
        "benchmarks/bench_dedup.py --sizes 1000000 (AMD EPYC, 2 cores, idle): deduplicate in 98.5 s, recall 0.998",
    ),
    "dedup_bytes_per_vector": Figure(
        3367.0, "peak bytes per vector (dim 512, process included)", MEASURED,
        "benchmarks/bench_dedup.py: 3,211 MiB peak resident at 1M x 512",
    ),
    "dedup_node_memory_bytes": Figure(
        256e9, "bytes of memory per dedup node", ASSUMED, "a large-memory CPU node",
    ),
    "dedup_node_cores": Figure(64.0, "CPU cores per dedup node", ASSUMED, "a large CPU node"),
}  # fmt: skip


def throughputs(overrides: dict[str, float] | None = None) -> dict[str, Figure]:
    """THROUGHPUTS with the user's values in place of any of them (their basis then says so)."""
    figures = dict(THROUGHPUTS)
    for name, value in (overrides or {}).items():
        if name not in figures:
            known = ", ".join(sorted(figures))
            raise UserError(f"--set {name}: no such figure; the figures are: {known}")
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--set {name}={value}: must be a positive number")
        if figures[name].unit.startswith("share") and value > 1:
            raise UserError(f"--set {name}={value}: a share lies in (0, 1]")
        figures[name] = replace(figures[name], value=float(value), basis="given", source="--set")
    return figures


def check_request(gpus: int, epochs: float, overrides: dict[str, float] | None) -> dict[str, Figure]:
    """The throughputs of a plan, after checking what the user asked for."""
    if gpus < 1:
        raise UserError(f"--gpus must be a positive integer, not {gpus}")
    if not (math.isfinite(epochs) and epochs > 0):
        raise UserError(f"--epochs must be a positive number, not {epochs}")
    return throughputs(overrides)


# --- model sizes, from our own model code --------------------------------------------------------
def transformer_shape(cfg: RunConfig) -> dict[str, int]:
    """Parameters (without embeddings) and the sequence of the configured transformer, counted on
    the meta device (nothing allocated, whatever its size)."""
    import torch

    from dalle.models.transformer import DalleTransformer

    grid = cfg.dvae.image_size // 2**cfg.dvae.downsample_steps
    with torch.device("meta"):
        model = DalleTransformer(cfg.transformer, cfg.tokenizer.vocab_size, cfg.dvae.codebook_size, grid)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(
        p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    )
    text_head, image_head = model.text_head.weight.numel(), model.image_head.weight.numel()
    return {
        "params": total,
        "non_embedding_params": total - embedding,
        # Each head runs on its own positions only: the text head on the text, the image head on the codes.
        "body_params": total - embedding - text_head - image_head,
        "text_head_params": text_head,
        "image_head_params": image_head,
        "seq_len": model.seq_len,
        "text_len": model.text_len,
        "codes": model.num_codes,
        "width": cfg.transformer.width,
        "depth": cfg.transformer.depth,
    }


def transformer_train_flops_per_token(shape: dict[str, int]) -> float:
    """Training FLOPs per token, averaged over a sequence: 6 per parameter a token passes through
    (forward and backward; each output head only on its own positions) and the dense attention's
    12 x depth x width x sequence (the convention MFU figures are quoted in)."""
    heads = shape["text_head_params"] * shape["text_len"] + shape["image_head_params"] * shape["codes"]
    return (
        6 * shape["body_params"]
        + 6 * heads / shape["seq_len"]
        + 12 * shape["depth"] * shape["width"] * shape["seq_len"]
    )


def dvae_encode_flops(cfg: RunConfig) -> float:
    """FLOPs of the dVAE encoder on one image, counted by torch's FLOP counter on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dalle.models.dvae import DiscreteVAE

    size = cfg.dvae.image_size
    with torch.device("meta"):
        model = DiscreteVAE(cfg.dvae)
        with FlopCounterMode(display=False) as counter:
            model.encoder(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def clip_image_flops(cfg: RunConfig) -> float:
    """FLOPs of the configured CLIP's image tower on one image (one forward pass at random weights)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if cfg.clip.model == "small":
        from dalle.models.clip import build_small_clip

        model = build_small_clip(cfg.clip.small)
        size = cfg.clip.small.image_size
    else:
        import logging

        import open_clip

        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": none are wanted here
        try:
            model = open_clip.create_model(cfg.clip.model, pretrained=None)
        finally:
            logging.getLogger().setLevel(quiet)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def model_shapes(cfg: RunConfig) -> dict[str, Any]:
    """What `plan` needs of the configured models: the transformer's shape, FLOPs per image of the
    dVAE encoder and of the CLIP image tower."""
    return {
        "transformer": transformer_shape(cfg),
        "dvae_encode_flops": dvae_encode_flops(cfg),
        "clip_image_flops": clip_image_flops(cfg),
    }


# --- the plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    stage: str
    what: str
    value: float
    unit: str
    basis: str


def plan(
    cfg: RunConfig,
    pairs: int,
    gpus: int,
    epochs: float = 1.0,
    overrides: dict[str, float] | None = None,
    shapes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The plan of a run of `pairs` URL-list rows, with `gpus` GPUs for the GPU stages.
    `shapes`: the model sizes, when already counted (tests); else counted from `cfg`."""
    if pairs < 1:
        raise UserError(f"--pairs must be a positive number of URL-list rows, not {pairs}")
    f = check_request(gpus, epochs, overrides)
    shapes = shapes or model_shapes(cfg)
    shape = shapes["transformer"]
    downloaded = pairs * f["download_success"].value
    kept = downloaded * f["kept_after_curation"].value
    dim = 512  # stored CLIP vectors (ViT-B/32); the dedup figures were measured at this dimension
    lines: list[Line] = []

    def add(stage: str, what: str, value: float, unit: str, *figures: str) -> None:
        bases = sorted({f[name].basis for name in figures}) or [COMPUTED]
        lines.append(Line(stage, what, value, unit, " + ".join(bases)))

    # Storage per stage.
    add("storage", "URL list", pairs * f["url_row_bytes"].value, "bytes", "url_row_bytes")
    add("storage", "raw shards (crawl)", downloaded * f["image_bytes"].value, "bytes",
        "download_success", "image_bytes")  # fmt: skip
    add("storage", "curated shards", kept * (f["image_bytes"].value + 200), "bytes",
        "download_success", "kept_after_curation", "image_bytes")  # fmt: skip
    add("storage", "CLIP embeddings (image and text, float32)", downloaded * (2 * dim * 4 + 48), "bytes",
        "download_success")  # fmt: skip
    token_row = shape["text_len"] * 4 + shape["codes"] * 2 + 100
    add("storage", "token shards", kept * token_row, "bytes", "download_success", "kept_after_curation")
    add("storage", "one transformer checkpoint (weights and AdamW state)", shape["params"] * 16, "bytes")

    # Crawl.
    crawl_node_h = pairs / f["crawl_urls_per_node_s"].value / 3600
    add("crawl", "node-hours", crawl_node_h, "node-hours", "crawl_urls_per_node_s")

    # CLIP embedding: the GPU's arithmetic or the CPU's decoding, whichever is slower.
    gpu_rate = f["gpu_peak_flops"].value * f["mfu_inference"].value / shapes["clip_image_flops"]
    decode_rate = f["decode_images_per_core_s"].value * f["cpu_cores_per_gpu"].value
    embed_rate = min(gpu_rate, decode_rate)
    add("embed", "GPU-hours", downloaded / embed_rate / 3600, "GPU-hours",
        "gpu_peak_flops", "mfu_inference", "decode_images_per_core_s", "cpu_cores_per_gpu")  # fmt: skip
    lines.append(Line("embed", "limited by", 0.0, "decode" if decode_rate < gpu_rate else "GPU", COMPUTED))

    # Dedup over the vectors that passed the filters (every download, as an upper bound).
    index_bytes = downloaded * f["dedup_bytes_per_vector"].value
    nodes = max(1, math.ceil(index_bytes / (0.8 * f["dedup_node_memory_bytes"].value)))
    core_seconds = downloaded / 1e6 * f["dedup_s_per_million"].value * 2  # measured on 2 cores
    add("dedup", "peak memory, whole index", index_bytes, "bytes", "dedup_bytes_per_vector")
    add("dedup", "nodes if sharded by coarse cluster", nodes, "nodes", "dedup_node_memory_bytes")
    add("dedup", "hours on those nodes", core_seconds / (nodes * f["dedup_node_cores"].value) / 3600,
        "hours", "dedup_s_per_million", "dedup_node_cores")  # fmt: skip

    # Tokenize: the dVAE encoder over every kept image.
    tok_rate = f["gpu_peak_flops"].value * f["mfu_inference"].value / shapes["dvae_encode_flops"]
    tok_rate = min(tok_rate, decode_rate)
    add("tokenize", "GPU-hours", kept / tok_rate / 3600, "GPU-hours",
        "gpu_peak_flops", "mfu_inference", "decode_images_per_core_s")  # fmt: skip

    # Transformer training.
    tokens = kept * epochs * shape["seq_len"]
    flops = tokens * transformer_train_flops_per_token(shape)
    gpu_days = flops / (f["gpu_peak_flops"].value * f["mfu_train"].value) / 86400
    add("train_transformer", "training FLOPs", flops, "FLOPs")
    add("train_transformer", "GPU-days", gpu_days, "GPU-days", "gpu_peak_flops", "mfu_train")
    add("train_transformer", f"days on {gpus} GPUs", gpu_days / gpus, "days", "gpu_peak_flops", "mfu_train")

    return {
        "pairs": pairs,
        "gpus": gpus,
        "epochs": epochs,
        "downloaded": round(downloaded),
        "kept": round(kept),
        "transformer": shape,
        "dvae_encode_gflops": round(shapes["dvae_encode_flops"] / 1e9, 3),
        "clip_image_gflops": round(shapes["clip_image_flops"] / 1e9, 3),
        "lines": [line.__dict__ for line in lines],
        "throughputs": {name: fig.__dict__ for name, fig in f.items()},
    }


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        for size, name in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= size:
                return f"{value / size:,.1f} {name}"
        return f"{value:,.0f} B"
    if unit == "FLOPs":
        return f"{value:.2e} FLOPs"
    if value == 0.0 and unit in ("decode", "GPU"):
        return unit
    if unit == "nodes":
        return f"{value:.0f} {unit}"
    if value < 10:
        return f"{value:.2g} {unit}"
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def plan_text(result: dict[str, Any]) -> str:
    shape = result["transformer"]
    head = (
        f"plan for {result['pairs']:,} URL-list rows ({result['downloaded']:,} downloaded, "
        f"{result['kept']:,} kept), {result['epochs']:g} epoch(s), {result['gpus']} GPUs; transformer "
        f"{shape['params'] / 1e6:,.0f}M parameters, {shape['seq_len']} tokens per pair"
    )
    rows = [head, ""]
    for line in result["lines"]:
        rows.append(f"  {line['stage']:18s} {line['what']:52s} {_amount(line['value'], line['unit']):>16s}  "
                    f"[{line['basis']}]")  # fmt: skip
    rows += ["", "throughputs (dalle/plan.py THROUGHPUTS; change one with --set NAME=VALUE):"]
    for name, fig in result["throughputs"].items():
        rows.append(f"  {name:26s} {fig['value']:>12,.4g} {fig['unit']}  [{fig['basis']}: {fig['source']}]")
    return "\n".join(rows)


def plans_table(results: list[dict[str, Any]]) -> str:
    """Several plans side by side: one column per pair count, one row per line of the plan."""
    head = ["stage", "what", *(f"{r['pairs']:,} pairs" for r in results), "basis"]
    rows = [head]
    for index, line in enumerate(results[0]["lines"]):
        amounts = [_amount(r["lines"][index]["value"], line["unit"]) for r in results]
        rows.append([line["stage"], line["what"], *amounts, line["basis"]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    shape = results[0]["transformer"]
    text = [
        (
            f"plans with {results[0]['gpus']} GPUs, {results[0]['epochs']:g} epoch(s), transformer "
            f"{shape['params'] / 1e6:,.0f}M parameters, {shape['seq_len']} tokens per pair"
        ),
        "",
    ]
    text += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(text)
