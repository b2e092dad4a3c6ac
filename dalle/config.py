"""Run configuration: pydantic models loaded from YAML.

Every field has a default and a one-line description; an unknown key is an error
that names the key, so a typo never silently falls back to a default. Numbers have their
ranges, and no float may be NaN or infinite. A value changed in code goes through
`with_changes`, which validates it like a loaded one (`model_copy(update=...)` does not).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dalle.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or value that cannot be used; the message says what to change."""


def plugin_function(setting: str, module_name: str, function: str, described: str):
    """The function `function` of the plug-in module that the config key `setting` names (e.g.
    gallery.evaluator: demo.evaluation); a ConfigError naming the key when the module cannot be
    imported or lacks the function (`described` says what it should be, e.g. "evaluator(cfg)")."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{setting} {module_name!r} cannot be imported ({err}); install the plug-in or set {setting}: null"
        ) from None
    found = getattr(module, function, None)
    if not callable(found):
        raise ConfigError(f"{setting} {module_name!r} has no function {described}")
    return found


# The longest accepted duration: a longer one is a typo (and timers overflow past about 30 years).
MAX_SECONDS = 366 * 24 * 3600.0
MAX_SEED = 2**32 - 1  # a seed every RNG the pipeline seeds takes as it is

Steps = Annotated[int, Field(ge=1)]
"""A count of optimizer steps (a step total, or steps to add): at least 1. Flow parameters use it too."""


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a local path or an s3:// URI, not blank")
    return value


Location = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]
"""A local path or s3:// URI, as a setting or a flow parameter."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SourceConfig(_Section):
    """Where the pipeline's image-caption pairs come from."""

    urls: Location | None = Field(
        None,
        description="URL list (local path or s3://; Parquet, CSV, TSV, JSONL or TXT, read per the crawl "
        "section) for `dalle pipeline` to crawl. A plug-in such as the demo may set it for its own source.",
    )


# A host name as RFC 1123 spells it: dot-separated labels of letters, digits and inner hyphens.
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def host_key(host: object) -> str | None:
    """The form a host name is looked up in the host map by: lower case, without a final dot."""
    if isinstance(host, bytes):
        host = host.decode("ascii", errors="replace")
    return host.lower().rstrip(".") if isinstance(host, str) else None


def host_map(mapping: Mapping[str, str] | None) -> dict[str, str]:
    """A static host map, checked and normalised: each key a host name (lower case, no final dot),
    each value an IP address literal (in its canonical spelling). ValueError says which entry is wrong."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"resolve must map host names to IP addresses, not {type(mapping).__name__}")
    checked: dict[str, str] = {}
    for name, address in mapping.items():
        key = host_key(name)
        try:
            ipaddress.ip_address(key or "")
        except ValueError:
            pass
        else:
            raise ValueError(f"resolve key {name!r} is an IP address; the map gives host names an address")
        labels = key.split(".") if key else []
        if (
            not labels
            or len(key) > 253
            or not all(_HOST_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()  # 127.1 or 2130706433: an address in another spelling, not a name
        ):
            raise ValueError(
                f"resolve key {name!r} is not a host name (letters, digits and '-' in dot-separated "
                "labels, e.g. site17.crawl.test)"
            )
        try:
            if not isinstance(address, str):
                raise TypeError(address)
            ip = ipaddress.ip_address(address.strip())
        except (ValueError, TypeError):
            raise ValueError(
                f"resolve[{name!r}] = {address!r} is not an IP address like 127.0.0.5 or ::1 "
                "(a name cannot be mapped to another name)"
            ) from None
        if key in checked and checked[key] != str(ip):
            raise ValueError(f"resolve maps {key!r} twice ({checked[key]} and {ip}); give one address")
        checked[key] = str(ip)
    return dict(sorted(checked.items()))


class CrawlConfig(_Section):
    """Downloading the URL list with img2dataset."""

    input_format: Literal["auto", "parquet", "csv", "tsv", "txt", "jsonl"] = Field(
        "auto", description="Format of the URL list; 'auto' picks it from the file extension."
    )
    url_col: str = Field("url", min_length=1, description="Column of the URL list that holds the image URL.")
    caption_col: str = Field(
        "caption", min_length=1, description="Column of the URL list that holds the caption."
    )
    column_names: list[str] | None = Field(
        None,
        description="Column names of a CSV/TSV list that has no header row, in file order "
        "(CC3M's TSV: [caption, url]); unset, the first row is the header.",
    )
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs of non-public networks the crawler may connect to (e.g. 127.0.0.0/8); public ones always may.",
    )
    resolve: dict[str, str] = Field(
        default_factory=dict,
        description="Static host map, like curl's --resolve HOST:IP: host name -> IP address used instead "
        "of DNS for that name (robots.txt and image fetches; URL, Host header and TLS keep the name). A "
        "mapped address is still checked: one in a non-public network needs allow_networks.",
    )
    distributor: Literal["multiprocessing", "ray", "pyspark"] = Field(
        "multiprocessing",
        description="img2dataset's engine for running shards: 'multiprocessing' (worker processes on this "
        "machine), 'ray' (needs the ray extra) or 'pyspark' (needs the spark extra and Java 17+). The "
        "network guard runs in every worker of each.",
    )
    ray_address: str | None = Field(
        None,
        min_length=1,
        description="distributor 'ray': the Ray cluster to connect to ('auto', 'HOST:PORT' or "
        "'ray://HOST:PORT'); unset, a local Ray with `processes` CPUs is started for the crawl and "
        "stopped after it.",
    )
    spark_master: str | None = Field(
        None,
        min_length=1,
        description="distributor 'pyspark': the Spark master URL ('local[4]', 'spark://HOST:7077', "
        "'yarn', 'k8s://...'); unset, 'local[processes]'. The session is started for the crawl and "
        "stopped after it.",
    )
    processes: int = Field(
        2,
        ge=1,
        description="img2dataset worker processes (for 'ray' and 'pyspark' without an address: the "
        "local engine's CPUs).",
    )
    threads: int = Field(32, ge=1, description="Download threads per worker process.")
    timeout_s: float = Field(10.0, gt=0, le=MAX_SECONDS, description="Per-request timeout in seconds.")
    retries: int = Field(0, ge=0, description="Download retries per URL after a failure.")
    samples_per_shard: int = Field(
        10_000, ge=1, description="URLs per img2dataset shard (the unit of resume)."
    )
    user_agent_token: str = Field(
        "dalle-pipeline",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Token sent in the User-Agent and matched in robots.txt and X-Robots-Tag (letters, "
        "digits, '-' and '_').",
    )
    respect_robots_txt: bool = Field(
        True, description="Skip URLs that the site's robots.txt disallows for us."
    )
    robots_timeout_s: float = Field(
        5.0, gt=0, le=MAX_SECONDS, description="Timeout for fetching one robots.txt."
    )
    max_crawl_s: float = Field(
        12 * 3600.0,
        gt=0,
        le=MAX_SECONDS,
        description="Wall-clock limit of one crawl (img2dataset's process is stopped after it; finished "
        "shards are kept and the next run resumes).",
    )
    stall_s: float = Field(
        1800.0,
        gt=0,
        le=MAX_SECONDS,
        description="Stop a crawl whose img2dataset process prints nothing for this long (a hung download).",
    )
    max_image_bytes: int = Field(
        16 * 2**20,
        ge=1024,
        description="Largest response body fetched for one image, in bytes (16 MiB); a larger one is "
        "dropped as response_too_large before it fills memory.",
    )
    max_download_s: float = Field(
        60.0,
        gt=0,
        le=MAX_SECONDS,
        description="Wall-clock limit for one whole response (a server that drips bytes never trips "
        "the per-read timeout_s).",
    )
    host_interval_s: float = Field(
        0.0,
        ge=0,
        le=MAX_SECONDS,
        description="Politeness: least seconds between two requests to one host, across the crawl's "
        "worker processes (0: no limit).",
    )
    max_retry_after_s: float = Field(
        60.0,
        ge=0,
        le=MAX_SECONDS,
        description="After HTTP 429 or 503 with Retry-After, a host's next requests wait as asked, up "
        "to this many seconds.",
    )
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that make img2dataset drop an image (opt-out).",
    )

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as err:
                raise ValueError(
                    f"allow_networks entry {cidr!r} is not a CIDR like 127.0.0.0/8: {err}"
                ) from None
        return value

    @field_validator("resolve", mode="before")
    @classmethod
    def _host_map(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(  # noqa: TRY004 - pydantic reports ValueError, not TypeError
                "resolve maps host names to IP addresses, e.g. {site1.crawl.test: 127.0.0.5}; "
                f"got {type(value).__name__}"
            )
        return host_map(value)

    @field_validator("column_names")
    @classmethod
    def _distinct_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value or not all(name.strip() for name in value):
                raise ValueError("column_names needs one non-empty name per column of the file")
            repeated = sorted({name for name in value if value.count(name) > 1})
            if repeated:
                raise ValueError(f"column_names repeats {repeated}; give each column its own name")
        return value

    @field_validator("ray_address", "spark_master")
    @classmethod
    def _no_blank_address(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value != value.strip()):
            raise ValueError(f"{value!r} has blanks; give the address itself, or leave it unset")
        return value

    @model_validator(mode="after")
    def _two_columns(self) -> CrawlConfig:
        if self.url_col == self.caption_col:
            raise ValueError(f"url_col and caption_col both name {self.url_col!r}; they are two columns")
        return self

    @model_validator(mode="after")
    def _address_of_the_engine(self) -> CrawlConfig:
        for name, engine in (("ray_address", "ray"), ("spark_master", "pyspark")):
            if getattr(self, name) is not None and self.distributor != engine:
                raise ValueError(
                    f"{name} is set but distributor is {self.distributor!r}; it is used only with "
                    f"distributor: {engine}"
                )
        return self


class FilterConfig(_Section):
    """Rule filters and the CLIP-score filter; every decision is recorded with its threshold."""

    min_side: int = Field(32, ge=1, description="Smallest accepted image side, in pixels.")
    max_aspect_ratio: float = Field(
        3.0, ge=1, description="Largest accepted ratio of long side to short side."
    )
    min_image_bytes: int = Field(200, ge=0, description="Smallest accepted encoded image size, in bytes.")
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest accepted declared width*height (guards against decompression bombs).",
    )
    min_caption_chars: int = Field(3, ge=0, description="Shortest accepted caption, in characters.")
    max_caption_chars: int = Field(512, ge=1, description="Longest accepted caption, in characters.")
    min_caption_words: int = Field(1, ge=0, description="Fewest accepted words in a caption.")
    max_caption_words: int = Field(80, ge=1, description="Most accepted words in a caption.")
    clip_score_threshold: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Drop pairs whose image-caption CLIP cosine similarity is below this value.",
    )
    clip_keep_top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Keep only this top fraction of pairs by CLIP score, over the whole input.",
    )

    @model_validator(mode="after")
    def _one_clip_rule(self) -> FilterConfig:
        if self.clip_score_threshold is not None and self.clip_keep_top_fraction is not None:
            raise ValueError("set clip_score_threshold or clip_keep_top_fraction, not both")
        for low, high in (
            ("min_caption_chars", "max_caption_chars"),
            ("min_caption_words", "max_caption_words"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} {getattr(self, low)} is above {high} {getattr(self, high)}")
        return self


class SmallClipConfig(_Section):
    """The architecture of the small CLIP trained on the crawled pairs when no pretrained model or
    checkpoint is given (its optimisation is `train_clip`)."""

    image_size: int = Field(64, ge=16, description="Input side of the small CLIP's image tower.")
    embed_dim: int = Field(128, ge=8, description="Dimension of the joint embedding space.")
    vision_width: int = Field(128, ge=8, description="Width of the image tower (a small ViT).")
    vision_layers: int = Field(3, ge=1, description="Transformer layers of the image tower.")
    patch_size: int = Field(8, ge=2, description="ViT patch size of the image tower.")
    text_width: int = Field(128, ge=8, description="Width of the text tower.")
    text_layers: int = Field(3, ge=1, description="Transformer layers of the text tower.")
    text_heads: int = Field(4, ge=1, description="Attention heads of the text tower.")
    context_length: int = Field(32, ge=4, description="Text tokens per caption (open_clip's BPE).")


class ClipConfig(_Section):
    """Which open_clip model embeds images and captions."""

    model: str = Field(
        "ViT-B-32", description="open_clip architecture name, used with `pretrained` or `checkpoint`."
    )
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. laion2b_s34b_b79k); needs network access."
    )
    checkpoint: Location | None = Field(
        None, description="Local or S3 path of a CLIP checkpoint to load instead."
    )
    small: SmallClipConfig = Field(
        default_factory=SmallClipConfig,
        description="Architecture of the small CLIP trained when neither is set (trained per train_clip).",
    )
    hard_negatives: str | None = Field(
        None,
        description="Python module with hard_negatives(caption, rng) -> list of captions that are near "
        "the true one but wrong (the relation turned, the colours swapped, another count): when the small "
        "CLIP trains, some of them (hard_negatives_per_caption) join the batch's captions as an extra negative (NegCLIP), so "
        "that the reranker learns to tell them apart (e.g. demo.negatives); null: none.",
    )
    hard_negatives_per_caption: int = Field(
        1, ge=1, description="The most hard negatives a caption brings into its batch (chosen at random)."
    )
    mirrored_captions: str | None = Field(
        None,
        description="Python module with mirrored_caption(caption, axis) -> the caption of the image mirrored "
        "left to right (axis 'horizontal') or upside down ('vertical'), or None when the mirror changes "
        "nothing the caption says or shows what no caption says (e.g. demo.negatives). When the small CLIP "
        "trains, a pair whose mirror changes its caption ('a red circle left of a blue square') brings its "
        "mirrored image with the new caption into the batch as a twin, so each is the other's hardest "
        "negative and the reranker must tell the relation from the pixels; null: no twins.",
    )
    mirror_twins_per_batch: int = Field(
        16, ge=0, description="The most mirrored twins a batch of the small CLIP gains (chosen at random)."
    )
    blur_side: int | None = Field(
        None,
        ge=4,
        description="Training the small CLIP: a share (blur_probability) of its images are shrunk to this "
        "side and enlarged back before augmentation, so that it also learns from images as blurry as the "
        "decoded samples it reranks (e.g. the dVAE's image_size); null: images as crawled.",
    )
    blur_probability: float = Field(
        0.5, ge=0, le=1, description="The share of the small CLIP's training images that blur_side shrinks."
    )
    batch_size: int = Field(128, ge=1, description="Images or captions per embedding batch.")
    device: str = Field(
        "auto", description="torch device for CLIP: 'auto' picks cuda when available, else cpu."
    )


class DedupConfig(_Section):
    """Exact (sha256) and near (cosine similarity of CLIP image vectors) duplicate removal."""

    vectors: Literal["auto", "clip", "clip_tokens"] = Field(
        "auto",
        description="Near-duplicate vectors: CLIP image embeddings, the image tower's patch tokens, or auto "
        "(tokens for a small CLIP trained here, embeddings for a pretrained one).",
    )
    near_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Cosine similarity at or above which two images are near duplicates; "
        "default 0.95 for CLIP embeddings, 0.99 for patch tokens.",
    )
    partition_min_size: int = Field(
        50_000,
        ge=1,
        description="From this many vectors on, the vectors are partitioned (`partition`) and searched part "
        "by part, instead of exactly all against all.",
    )
    partition: Literal["clusters", "ivf"] = Field(
        "clusters",
        description="How large sets are partitioned: clusters (spherical k-means, exact products inside each "
        "cluster, vectors near a boundary in up to `max_clusters_per_vector` clusters) or ivf (a FAISS "
        "IVF-Flat index searched at ivf_nprobe).",
    )
    clusters: int | None = Field(
        None, ge=1, description="k-means clusters for partition: clusters; default about sqrt(N)."
    )
    boundary_margin: float = Field(
        0.5,
        ge=0,
        le=1,
        description="partition clusters: a vector also joins every cluster whose centroid is at most this share "
        "of the exact bound (2 x the largest near-duplicate distance) farther than its own; 1 finds every pair "
        "whose ends share one of their max_clusters_per_vector nearest clusters.",
    )
    max_clusters_per_vector: int = Field(
        3, ge=1, le=16, description="partition clusters: the most clusters one vector is searched in."
    )
    cluster_task_vectors: int = Field(
        50_000,
        ge=1,
        description="partition clusters with orchestration.dask_address: consecutive clusters are searched "
        "on the Dask workers in tasks of at least this many member vectors (the last may hold fewer).",
    )
    ivf_nlist: int | None = Field(
        None, ge=1, description="IVF cells (partition: ivf); default about 4*sqrt(N)."
    )
    ivf_nprobe: int = Field(16, ge=1, description="IVF cells visited per query (partition: ivf).")
    recall_sample: int = Field(
        500, ge=1, description="Queries used to measure the index's recall against brute force."
    )


class DVAEConfig(_Section):
    """The discrete VAE that turns an image into a grid of codes (stage one of the paper)."""

    image_size: int = Field(64, ge=8, description="Side of the square images the dVAE encodes (paper: 256).")
    downsample_steps: int = Field(
        3,
        ge=1,
        le=6,
        description="Halvings from image to code grid: grid = image_size / 2**steps (paper: 3, 32x32).",
    )
    codebook_size: int = Field(512, ge=2, description="Number of distinct image codes (paper: 8192).")
    hidden_width: int = Field(
        64, ge=8, description="Channels of the first encoder group; doubles per group (paper: 256)."
    )
    blocks_per_group: int = Field(1, ge=1, description="Residual blocks per resolution group (paper: 2).")
    reconstruction: Literal["logit_laplace", "mse"] = Field(
        "logit_laplace",
        description="Reconstruction likelihood: the paper's logit-Laplace, or mean squared error.",
    )
    logit_laplace_eps: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="Pixels are squeezed into [eps, 1-eps] for the logit-Laplace likelihood.",
    )
    temperature_start: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at step 0.")
    temperature_end: float = Field(
        1 / 16, gt=0, description="Gumbel-softmax temperature reached after annealing."
    )
    temperature_anneal_steps: int = Field(
        5000, ge=1, description="Steps of the cosine annealing of the temperature (paper: 150,000)."
    )
    kl_weight: float = Field(
        6.6,
        ge=0,
        description="Final weight beta of the KL term toward the uniform prior, in the paper's units.",
    )
    usage_weight: float = Field(
        0.02,
        ge=0,
        description="Weight of the KL from the batch's average code distribution to uniform: keeps codes "
        "alive until the encoder has told its inputs apart (without it, distinct inputs can share one "
        "code for good). 0 is the paper's objective.",
    )
    kl_warmup_steps: int = Field(
        500, ge=0, description="Steps over which beta rises linearly from 0 (paper: 5,000)."
    )

    @model_validator(mode="after")
    def _grid_divides(self) -> DVAEConfig:
        if self.image_size % 2**self.downsample_steps:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**downsample_steps = {2**self.downsample_steps}"
            )
        return self

    @property
    def grid(self) -> int:
        """Side of the code grid."""
        return self.image_size // 2**self.downsample_steps


class TokenizerConfig(_Section):
    """The text tokenizer: a byte-level BPE trained on the run's captions, or open_clip's."""

    kind: Literal["bpe", "open_clip"] = Field(
        "bpe",
        description="'bpe': trained here on the captions; 'open_clip': open_clip's fixed BPE (49,408 tokens).",
    )
    vocab_size: int = Field(
        10_000,
        ge=64,
        description="Largest BPE vocabulary, special tokens included (paper: 16,384); bpe only.",
    )
    min_frequency: int = Field(2, ge=1, description="Fewest occurrences for a BPE merge; bpe only.")
    lowercase: bool = Field(True, description="Lower-case captions before tokenizing.")
    bpe_dropout: float = Field(
        0.0, ge=0, lt=1, description="BPE dropout while training the transformer (0 disables it); bpe only."
    )


class TokenizeConfig(_Section):
    """Turning curated pairs into token shards."""

    rows_per_shard: int = Field(10_000, ge=1, description="Rows per token shard (the unit of resume).")
    batch_size: int = Field(64, ge=1, description="Images per dVAE encoding batch.")
    device: str = Field(
        "auto", description="torch device for encoding: 'auto' picks cuda when available, else cpu."
    )


class TrainConfig(_Section):
    """One model's optimisation: the training loop shared by the dVAE, the transformer and the CLIP."""

    batch_size: int = Field(16, ge=1, description="Samples per micro-batch on each process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    max_steps: Steps = Field(
        1000, description="Optimizer steps to reach (the total, counting steps already done)."
    )
    lr: float = Field(3e-4, gt=0, description="Peak learning rate of AdamW.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.96), description="AdamW betas (paper, transformer: 0.9, 0.96)."
    )
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(
        4.5e-2, ge=0, description="AdamW weight decay, on linear and conv weights only."
    )
    grad_clip: float | None = Field(
        4.0, gt=0, description="Clip the global gradient norm to this (paper: 4); null: off."
    )
    warmup_steps: int = Field(100, ge=0, description="Steps of linear learning-rate warm-up from 0.")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine",
        description="Decay after warm-up: cosine to min_lr_ratio, step (x step_gamma every step_every), constant.",
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate of the cosine, as a share of lr."
    )
    step_every: int = Field(1000, ge=1, description="Steps between decays of the step schedule.")
    step_gamma: float = Field(
        0.5, gt=0, le=1, description="Factor applied at each decay of the step schedule."
    )
    checkpoint_every: int = Field(
        500, ge=1, description="Steps between checkpoints (one is also written at the end)."
    )
    log_every: int = Field(
        10, ge=1, description="Steps between lines of the training metrics (reports/metrics/)."
    )
    max_bad_steps: int = Field(
        5,
        ge=1,
        description="Consecutive steps with a NaN/Inf loss or gradient (each skipped) before training stops.",
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of initialisation, data order and sampling noise."
    )
    device: str = Field(
        "auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="'auto': bf16 autocast on cuda, fp32 on cpu."
    )
    nproc: int | Literal["auto"] = Field(
        1,
        description="Processes on this node; more than 1 launches torchrun (DDP). 'auto': one per GPU "
        "(1 without a GPU).",
    )

    @field_validator("nproc")
    @classmethod
    def _positive_nproc(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError(f"nproc must be 'auto' or at least 1, got {value}")
        return value

    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on cuda."
    )
    fsdp: bool = Field(
        False, description="Shard parameters and optimizer state with FSDP instead of DDP (large models)."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per training process.")
    compile: bool = Field(
        False,
        description="Compile the model's forward with torch.compile (inductor) before training: faster "
        "steps on GPU after a compile of tens of seconds; on CPU it needs a C++ compiler (g++ or clang++).",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one device, for the model FLOPs utilisation (mfu) in the training "
        "metrics; null: known GPUs' bf16 peak, and no mfu on CPU (model_flops_per_s is always there).",
    )
    nnodes: int = Field(
        1,
        ge=1,
        le=4096,
        description="Machines training together. Above 1, every node runs the same `python -m dalle.train "
        "MODEL --out ROOT` on a run root they share (s3:// or a shared folder); they meet at rdzv_endpoint.",
    )
    rdzv_endpoint: str | None = Field(
        None,
        description="host:port where the nodes meet (torchrun's c10d rendezvous; the node whose address it "
        "is serves it). Needed when nnodes > 1; a single node meets on a free loopback port.",
    )
    rdzv_id: str = Field(
        "dalle",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of one multi-node training: the nodes of a run share it, two runs differ.",
    )
    node_addr: str | None = Field(
        None,
        description="Address this node is reached at by the others (torchrun --local-addr); default: "
        "what its host name resolves to.",
    )

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rdzv_endpoint must be host:port, such as node0.cluster:29400, not {value!r}")
        return value

    @model_validator(mode="after")
    def _nodes_meet_somewhere(self) -> TrainConfig:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"nnodes is {self.nnodes}, so the nodes need a place to meet: set rdzv_endpoint "
                "(host:port of one of them, the same on every node)"
            )
        return self


class GalleryConfig(_Section):
    """The gallery published for every transformer checkpoint, and the zero-shot evaluation in it."""

    samples_per_prompt: int = Field(
        32, ge=1, description="Samples drawn per prompt before reranking (paper: 512)."
    )
    top: int = Field(8, ge=1, description="Best samples shown per prompt, with their CLIP scores.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_k: int | None = Field(None, ge=1, description="Keep only the k most likely codes at each step.")
    top_p: float | None = Field(
        None, gt=0, le=1, description="Nucleus sampling: keep codes up to this probability mass."
    )
    cond_scale: float = Field(
        1.0, ge=0, description="Classifier-free guidance scale (1: off; needs cond_drop_prob > 0)."
    )
    batch_size: int = Field(64, ge=1, description="Images sampled at once.")
    relation_weight: float = Field(
        1.0,
        ge=0,
        description="Reranking a prompt that places one object relative to another ('a cat to the left of "
        "a dog', 'above', 'below', ...): the weight of its relation margin, each object's phrase scored on "
        "the image with the other side painted over (dalle.sample.relations), added to CLIP's score; "
        "0: CLIP's score alone.",
    )
    binding_weight: float = Field(
        1.0,
        ge=0,
        description="Reranking a prompt that names two objects with their attributes ('a red circle and a blue "
        "square'): the weight of its binding margin, each object's phrase scored on its own side of a cut "
        "against the phrases with their attributes swapped (dalle.sample.relations), added to CLIP's "
        "score; 0: CLIP's score alone.",
    )
    validation_prompts: int = Field(4, ge=0, description="Captions from the token shards shown as prompts.")
    prompts_file: Location | None = Field(
        None, description="A text file of extra prompts, one per line (local or s3://)."
    )
    completions: int = Field(
        4, ge=0, description="Images completed from their top rows (the paper's image-to-image)."
    )
    completion_samples: int = Field(4, ge=1, description="Completions drawn per image.")
    completion_rows: int | None = Field(
        None, ge=1, description="Code rows kept for completion; default half the grid."
    )
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed of the sampling noise: the same checkpoint gives the same gallery.",
    )
    device: str = Field(
        "auto", description="torch device for sampling: 'auto' picks cuda when available, else cpu."
    )
    evaluator: str | None = Field(
        None,
        description="Python module of an evaluation plug-in that adds prompt sections to each gallery and "
        "scores them (e.g. demo.evaluation, the captioned-shapes world's zero-shot evaluation); null: none.",
    )


ATTENTION_KINDS = ("full", "row", "column", "conv")


class TransformerConfig(_Section):
    """The decoder-only transformer over [text tokens ; image codes] (stage two of the paper)."""

    text_seq_len: int = Field(32, ge=1, description="Text tokens per caption, padded or cut (paper: 256).")
    width: int = Field(256, ge=8, description="Model width (paper: 3,968).")
    depth: int = Field(4, ge=1, description="Transformer layers (paper: 64).")
    heads: int = Field(4, ge=1, description="Attention heads per layer (paper: 62).")
    mlp_ratio: int = Field(
        4, ge=1, description="Hidden width of the feed-forward block, as a multiple of width."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the residual branches.")
    attention_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the attention weights. On CPU it costs about 30% more time per step "
        "(attention leaves its fused kernel), where residual dropout costs about 13%.",
    )
    attention: str | list[str] = Field(
        "full",
        description="Attention mask per layer: 'full' (causal everywhere), 'paper' (row, column every fourth "
        "layer from the second, convolutional last), or a list naming one of full/row/column/conv per layer.",
    )
    conv_kernel: int = Field(11, ge=1, description="Side of the convolutional attention mask's window (odd).")
    text_loss_weight: float = Field(
        0.125,
        ge=0,
        le=1,
        description="Weight of the text loss; the image loss gets the rest (paper: 1/8 and 7/8).",
    )
    cond_drop_prob: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Chance of training a sample with its text dropped, for classifier-free guidance.",
    )
    checkpoint_activations: bool = Field(
        False, description="Recompute each layer's activations in the backward pass to save memory."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TransformerConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")
        self.layer_attention()  # raises on a bad value
        return self

    def layer_attention(self) -> list[str]:
        """The attention mask kind of every layer, first to last."""
        if isinstance(self.attention, list):
            kinds = list(self.attention)
            if len(kinds) != self.depth:
                raise ValueError(f"attention lists {len(kinds)} layers but depth is {self.depth}")
        elif self.attention == "full":
            kinds = ["full"] * self.depth
        elif self.attention == "paper":
            # Appendix B.1: layer i (1-based) uses column attention when (i - 2) % 4 == 0, row attention
            # otherwise, and the last layer uses convolutional attention.
            kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, self.depth + 1)]
            kinds[-1] = "conv"
        else:
            raise ValueError(
                f"attention must be 'full', 'paper' or a list of {ATTENTION_KINDS}, got {self.attention!r}"
            )
        unknown = sorted(set(kinds) - set(ATTENTION_KINDS))
        if unknown:
            raise ValueError(f"unknown attention kind(s) {unknown}; use {ATTENTION_KINDS}")
        return kinds


class OrchestrationConfig(_Section):
    """How the flows run as a service: time limits per flow, one trainer per run root, and where
    the curation's per-shard work runs."""

    dask_address: str | None = Field(
        None,
        description="Scheduler of a Dask cluster (tcp://host:8786) that runs the curation's per-shard work "
        "through Prefect's DaskTaskRunner; its workers must reach the run root (S3 or a shared folder). "
        "None: in the flow's own process.",
    )

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(tcp|tls|ucx)://[^\s/:]+(:\d{1,5})?/?", value):
            raise ValueError(
                f"dask_address must be a scheduler address such as tcp://scheduler:8786, not {value!r}"
            )
        return value

    curate_timeout_s: float = Field(
        24 * 3600.0, gt=0, le=MAX_SECONDS, description="Time limit of one curation flow run (crawl included)."
    )
    tokenize_timeout_s: float = Field(
        12 * 3600.0, gt=0, le=MAX_SECONDS, description="Time limit of one tokenize flow run."
    )
    train_timeout_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        le=MAX_SECONDS,
        description="Time limit of one training flow run (a stopped run resumes from its last checkpoint).",
    )
    gallery_timeout_s: float = Field(
        6 * 3600.0, gt=0, le=MAX_SECONDS, description="Time limit of one gallery flow run."
    )
    retrain_steps: Steps = Field(
        1000,
        description="Transformer steps that each batch of new token shards adds (the retraining "
        "deployment's more_steps, sent in the dalle.shards.updated event).",
    )
    trainer_wait_s: float = Field(
        0.0,
        ge=0,
        le=MAX_SECONDS,
        description="How long a trainer waits for another trainer of the same run root to finish; "
        "0 refuses it at once.",
    )
    trainer_lease_s: float = Field(
        300.0,
        ge=60,  # Prefect's shortest lease
        le=MAX_SECONDS,
        description="Lease of the trainer slot, renewed while training runs: a trainer that dies without "
        "releasing it frees it this long after (on a Prefect server).",
    )
    progress_every_s: float = Field(
        10.0,
        gt=0,
        le=MAX_SECONDS,
        description="Seconds between updates of the progress shown in the Prefect UI.",
    )


class DashboardsConfig(_Section):
    """Extra copies of the training metrics for the dashboards a team already uses (reports/metrics/
    stays the record). No secrets here: W&B's API key comes from WANDB_API_KEY, MLflow's credentials
    from its MLFLOW_TRACKING_* variables, both in the environment."""

    tensorboard: bool = Field(
        False,
        description="Write TensorBoard event files to reports/tensorboard/<model>/ in the run root "
        "(pip install 'dalle-pipeline[dashboards]').",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="Log the metrics to this MLflow tracking server or store (`pip install mlflow`); "
        "null: off.",
    )
    mlflow_experiment: str = Field("dalle", min_length=1, description="MLflow experiment of the runs.")
    wandb_project: str | None = Field(
        None,
        min_length=1,
        description="Log the metrics to this Weights & Biases project (API key: WANDB_API_KEY); null: off.",
    )
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="'offline': W&B writes its runs locally (WANDB_DIR), for `wandb sync` later."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if any(word in str(key).lower() for word in ("key", "token", "password", "secret")):
                    raise ValueError(
                        f"'{key}': secrets never go in the configuration (it is stored with the run); "
                        "set WANDB_API_KEY, or MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_PASSWORD, "
                        "in the environment"
                    )
        return data

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials_in_uri(cls, value: str | None) -> str | None:
        if value is not None and "@" in urlsplit(value).netloc:
            raise ValueError(
                "the tracking URI holds credentials; remove them and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
            )
        return value


class RunConfig(_Section):
    """Everything a run needs; `demo/config.yaml` is an instance of it."""

    source: SourceConfig = Field(
        default_factory=SourceConfig, description="The URL list the pipeline crawls."
    )
    crawl: CrawlConfig = Field(default_factory=CrawlConfig, description="Downloading with img2dataset.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Rule and CLIP-score filters.")
    clip: ClipConfig = Field(default_factory=ClipConfig, description="The CLIP model for scores and vectors.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicate removal.")
    dvae: DVAEConfig = Field(default_factory=DVAEConfig, description="The discrete VAE (image to codes).")
    transformer: TransformerConfig = Field(
        default_factory=TransformerConfig, description="The transformer over text tokens and image codes."
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The text tokenizer.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Writing token shards.")
    gallery: GalleryConfig = Field(
        default_factory=GalleryConfig, description="Galleries and zero-shot evaluation."
    )
    train_dvae: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            batch_size=32, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=None, warmup_steps=0
        ),
        description="Training the dVAE.",
    )
    train_transformer: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Training the transformer (defaults: the paper's AdamW settings).",
    )
    train_clip: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            batch_size=64,
            max_steps=600,
            lr=1e-3,
            betas=(0.9, 0.98),
            eps=1e-6,
            weight_decay=0.1,
            grad_clip=1.0,
            warmup_steps=30,
            min_lr_ratio=0.0,
            checkpoint_every=600,
            log_every=50,
        ),
        description="Training the small CLIP (defaults: open_clip's AdamW settings, cosine to zero).",
    )
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Time limits and trainer exclusivity of the flows."
    )
    dashboards: DashboardsConfig = Field(
        default_factory=DashboardsConfig,
        description="Extra copies of the training metrics for TensorBoard, MLflow or W&B.",
    )
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings of plug-ins, by plug-in name (e.g. demo: the captioned-shapes world); "
        "stored with the run, read only by the plug-in.",
    )

    @model_validator(mode="before")
    @classmethod
    def _training_sections_over_their_own_defaults(cls, data: Any) -> Any:
        # A train_* section that sets a few keys keeps that model's defaults for the others (the
        # dVAE's and the CLIP's differ from the transformer's), not TrainConfig's generic ones.
        if isinstance(data, dict):
            for name in ("train_dvae", "train_transformer", "train_clip"):
                if isinstance(data.get(name), dict):
                    defaults = cls.model_fields[name].default_factory().model_dump()
                    data = {**data, name: {**defaults, **data[name]}}
        return data

    @model_validator(mode="after")
    def _guidance_has_a_model(self) -> RunConfig:
        if self.gallery.cond_scale != 1.0 and self.transformer.cond_drop_prob == 0:
            raise ValueError(
                f"gallery.cond_scale {self.gallery.cond_scale} (classifier-free guidance) needs "
                "transformer.cond_drop_prob > 0 (e.g. 0.1), or set gallery.cond_scale: 1"
            )
        return self

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the named sections (all when none): a changed setting invalidates finished work."""
        data = self.model_dump(mode="json")
        if sections:
            data = {name: data[name] for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _describe_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<top level>"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' in {origin}; check its spelling against dalle/config.py")
        else:
            lines.append(f"'{key}' in {origin}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def as_config(config: RunConfig | dict[str, Any] | str | None) -> RunConfig:
    """A configuration given as a RunConfig, a mapping, or a YAML path or s3:// URI (None: defaults)."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, str):
        return load_config(config)
    return config_from_dict(config)


def config_from_dict(data: dict[str, Any] | None, origin: str = "configuration") -> RunConfig:
    """Validate a plain mapping as a RunConfig, with errors that name the offending key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin} must be a mapping of sections (source, crawl, ...), got {type(data).__name__}"
        )
    data = _from_older_release(data, origin)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe_errors(err, origin)) from None


_Settings = TypeVar("_Settings", bound=BaseModel)


def with_changes(settings: _Settings, origin: str, **changes: Any) -> _Settings:
    """`settings` (a section or a whole RunConfig) with `changes` applied and validated like a loaded
    configuration; a bad value raises a ConfigError naming the key and `origin` (e.g. "--max-steps")."""
    try:
        return type(settings).model_validate({**settings.model_dump(), **changes})
    except ValidationError as err:
        problems = [
            f"'{'.'.join(str(part) for part in item['loc'])}': "
            f"{'not a setting' if item['type'] == 'extra_forbidden' else item['msg']} (got {item['input']!r})"
            if item["loc"]
            else item["msg"]  # a rule across keys: its message names them
            for item in err.errors()
        ]
        raise ConfigError(f"invalid value from {origin}: " + "; ".join(problems)) from None


# What `source` and `clip.train` held before the demo became a plug-in and the CLIP joined the
# shared training loop; run roots written then keep loading.
_OLD_DEMO_SOURCE_KEYS = (
    "seed", "num_images", "image_size", "colors", "shapes", "heldout", "pair_fraction",
    "exact_duplicates", "near_duplicates",
)  # fmt: skip
_OLD_CLIP_TRAINING_KEYS = ("batch_size", "lr", "max_steps", "seed")


def _from_older_release(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """A configuration of an older release in today's keys (a copy; `data` is not changed)."""
    data = {**data}
    source = data.get("source")
    if isinstance(source, dict) and any(key in source for key in _OLD_DEMO_SOURCE_KEYS):
        source = {**source}
        world = {key: source.pop(key) for key in _OLD_DEMO_SOURCE_KEYS if key in source}
        data["source"] = source
        if not source.get("urls"):  # no URL list: it was a run of the built-in demo world
            data["plugins"] = {"demo": world, **(data.get("plugins") or {})}
            data["gallery"] = {"evaluator": "demo.evaluation", **(data.get("gallery") or {})}
    dedup = data.get("dedup")
    if isinstance(dedup, dict) and "ivf_min_size" in dedup:  # before large sets could be clustered
        dedup = {**dedup}
        dedup.setdefault("partition_min_size", dedup.pop("ivf_min_size"))
        dedup.pop("ivf_min_size", None)
        data["dedup"] = dedup
    clip = data.get("clip")
    if isinstance(clip, dict) and isinstance(clip.get("train"), dict):
        clip = {**clip}
        old = {**clip.pop("train")}
        if old.pop("max_seconds", None) is not None:
            raise ConfigError(
                f"'clip.train.max_seconds' in {origin}: the small CLIP now trains on the shared training loop, "
                "which stops at a step count only; remove it and set train_clip.max_steps"
            )
        training = {key: old.pop(key) for key in _OLD_CLIP_TRAINING_KEYS if key in old}
        clip["small"] = old
        data["clip"] = clip
        if training:
            data["train_clip"] = {**training, **(data.get("train_clip") or {})}
    return data


def load_config(path: str | Path | None = None) -> RunConfig:
    """Load a YAML run configuration from a local path or an s3:// URI; None gives the defaults."""
    if path is None:
        return RunConfig()
    text = _read_config_text(str(path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return config_from_dict(data, origin=str(path))


def _read_config_text(path: str) -> str:
    from dalle.storage import filesystem_for, is_s3

    missing = f"config file {path} does not exist; pass a YAML file such as demo/config.yaml"
    if is_s3(path):
        fs, key = filesystem_for(path)
        if not fs.isfile(key):
            raise ConfigError(missing)
        raw = fs.cat_file(key)
    else:
        if not Path(path).is_file():
            raise ConfigError(missing)
        raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None


def dump_config(config: RunConfig) -> str:
    """The configuration as YAML, for storing with a run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
