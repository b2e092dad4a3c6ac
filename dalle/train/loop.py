"""The training loop shared by the dVAE, the transformer and the CLIP.

A `ModelTraining` says what is trained (model, data, loss); `train` does the rest: AdamW with
decay only where the task says, warm-up then cosine or step decay, bf16 autocast on GPU,
gradient accumulation, a NaN/Inf guard, checkpoints with everything needed to resume
exactly (optimizer, scheduler, step, data position, every rank's RNG), metrics, and DDP
or FSDP when started by torchrun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import IterableDataset

from dalle.config import ConfigError, RunConfig, TrainConfig, dump_config
from dalle.errors import UserError
from dalle.models.weights import (
    FILES_SHA256,
    HASH_KEYS,
    CheckpointMismatch,
    load_model_state,
    newest_intact,
    read_checked,
    save_model,
)
from dalle.runroot import (
    CHECKPOINT_CONFIG,
    CHECKPOINT_TRAIN_STATE,
    METRICS_PART_LINES,
    MODELS_DIR,
    CorruptCheckpoint,
    checkpoint_dir,
    checkpoint_steps,
    latest_checkpoint,
    latest_pointer,
    metrics_file,
    new_metrics_run,
    set_latest,
)
from dalle.storage import Storage
from dalle.tokens.loader import make_loader
from dalle.train import checkpoint as ckpt
from dalle.train.distributed import DistInfo, all_agree, barrier, gather_objects, setup, teardown
from dalle.train.sinks import check_available, default_run_name, open_sinks


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive steps had a NaN or Inf loss or gradient."""


class ModelTraining(Protocol):
    """What a model's training needs beyond the shared loop (dalle/train/<model>.py)."""

    name: str  # folder under models/
    tokens_per_sample: int  # for tokens/s in the metrics (1 for image models)

    def build_model(self) -> nn.Module: ...

    def model_meta(self) -> dict[str, Any]:
        """The architecture, saved with each checkpoint; resuming requires an equal one."""
        ...

    def dataset(
        self, batch_size: int, seed: int, start_batch: int, rank: int, world_size: int
    ) -> IterableDataset:
        """An endless stream of batches for this rank, starting after its first `start_batch`."""
        ...

    def loss(
        self, model: nn.Module, batch: dict, step: int
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The loss to minimise and named parts to log (floats, or 0-d tensors read after the backward)."""
        ...

    def optimizer_groups(self, model: nn.Module, weight_decay: float) -> list[dict]: ...

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. to clamp a parameter); may do nothing."""
        ...


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of cfg.lr at `step`: linear warm-up, then the configured decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    after = step - cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** (after // cfg.step_every)
    progress = min(after / max(1, cfg.max_steps - cfg.warmup_steps), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MetricsLog:
    """This trainer run's lines of the training metrics: one JSON line per logged step, in files of
    its own (reports/metrics/<model>/..., see dalle.runroot.metrics_file) that no other trainer writes,
    each rewritten whole and atomically. The file names the step the run resumed from, so the
    readers drop an earlier run's lines past it (the resumed run writes those steps again)."""

    def __init__(self, storage: Storage, model: str, resume_step: int):
        self.storage, self.model, self.resume_step = storage, model, resume_step
        self.run = new_metrics_run()
        self.part, self.lines = 0, []
        self._write()  # the resume step is known to readers from now on
        self.last_flush = time.monotonic()

    def _write(self) -> None:
        rel = metrics_file(self.model, self.run, self.resume_step, self.part)
        self.storage.write_bytes(rel, "".join(line + "\n" for line in self.lines).encode())

    def add(self, record: dict[str, Any]) -> None:
        if len(self.lines) >= METRICS_PART_LINES:  # this part is full: written once more, then left alone
            self._write()
            self.part, self.lines = self.part + 1, []
        self.lines.append(json.dumps(record))

    def flush(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last_flush > 10:
            self._write()
            self.last_flush = time.monotonic()


# Dense bf16 peak FLOP/s of one device, by a piece of its CUDA name (vendors' data sheets; no sparsity).
KNOWN_BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(cfg: TrainConfig, device: torch.device) -> tuple[float | None, str]:
    """The device's peak FLOP/s for the MFU, and where it comes from (or why there is none)."""
    if cfg.peak_flops is not None:
        return cfg.peak_flops, "the configured peak_flops"
    if device.type != "cuda":
        return None, f"no peak FLOP/s is known for {device.type}; set peak_flops of the model's train section"
    name = torch.cuda.get_device_name(device)
    if not _bf16(cfg, device):
        return None, f"the known peaks are bf16 ones and this run is {cfg.precision}; set peak_flops"
    for key, flops in KNOWN_BF16_PEAK_FLOPS.items():
        if key in name:
            return flops, f"{key} bf16 dense"
    return None, f"no peak FLOP/s is known for {name}; set peak_flops of the model's train section"


def _bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16(cfg, device))


def _wrap(model: nn.Module, cfg: TrainConfig, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        model.to(memory_format=torch.contiguous_format)  # FSDP shards contiguous parameters only
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _compile(model: nn.Module, device: torch.device, name: str, log) -> None:
    """torch.compile of the (wrapped) model's forward, in place: the state dict keeps its keys, so
    checkpoints of compiled and eager runs are interchangeable."""
    if device.type == "cpu" and not any(
        shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c
    ):
        raise ConfigError(
            f"train_{name}.compile is set and the device is the CPU, where torch.compile generates C++: "
            "no C++ compiler was found (CXX, g++ or clang++); install one, or set compile: false"
        )
    model.compile()
    log(f"{name}: the model's forward is compiled with torch.compile (the first steps include the compile)")


def _utilisation(flops_per_sample: float | None, samples_per_s: float, peak: float | None) -> dict:
    """model_flops_per_s (of one process) and mfu (null without a known peak) for a metrics record."""
    if flops_per_sample is None:
        return {}
    achieved = flops_per_sample * samples_per_s
    return {"model_flops_per_s": achieved, "mfu": achieved / peak if peak else None}


def _weights_checksum(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _state_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _check_meta(found: dict, expected: dict, where: str) -> None:
    found = {k: v for k, v in found.items() if k not in HASH_KEYS}
    if found != expected:
        keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        details = "; ".join(f"{k}: checkpoint {found.get(k)!r}, now {expected.get(k)!r}" for k in keys)
        raise CheckpointMismatch(
            f"{where} was trained with another model configuration ({details}); "
            "use the run's own config (omit --config), or train into another --out"
        )


def train(
    task: ModelTraining,
    storage: Storage,
    run_cfg: RunConfig,
    cfg: TrainConfig,
    resume: bool = True,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Train `task` up to cfg.max_steps (a total: steps already in the checkpoint count) and return the
    URI of the newest checkpoint. Runs alone or as one rank of a torchrun job. The main rank calls
    `on_metrics` with each logged record (every log_every steps), `on_checkpoint` with each checkpoint."""
    info = setup(cfg)
    try:
        return _train(task, storage, run_cfg, cfg, info, resume, on_checkpoint, log, on_metrics)
    finally:
        teardown()


def _train(task, storage, run_cfg, cfg, info, resume, on_checkpoint, log, on_metrics) -> str:
    # Every global generator a model, a library or a future change may draw from, not only torch's:
    # a run is repeatable from its seed, and a resumed one restores them from its checkpoint.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = task.build_model().to(info.device)
    meta = task.model_meta()
    if not resume and storage.exists(latest_pointer(task.name)):
        try:
            newest = latest_checkpoint(storage, task.name).step
        except CorruptCheckpoint:
            newest = max(checkpoint_steps(storage, task.name), default="?")
        raise CheckpointMismatch(
            f"{storage.uri(f'{MODELS_DIR}/{task.name}')} already has checkpoints up to step {newest}; "
            "resume it (the default), or train into another --out"
        )

    def load_for_resume(rel: str) -> tuple[dict, dict]:
        state, found_meta = load_model_state(storage, rel)
        _check_meta(found_meta, meta, storage.uri(rel))  # another configuration: an error, no fall-back
        for name, sha256 in (found_meta.get(FILES_SHA256) or {}).items():
            if name != CHECKPOINT_TRAIN_STATE:  # read and checked by load_train_state
                read_checked(storage, rel, name, sha256)
        return state, ckpt.load_train_state(storage, rel)

    # The checkpoint latest.json names or, when it is damaged, the newest intact one before it (warned).
    found = newest_intact(storage, task.name, load_for_resume, log if info.is_main else (lambda m: None))
    step, batches, bad_total, train_state = 0, 0, 0, None
    existing_uri = ""
    if found is not None:
        _, rel, (state, train_state) = found
        existing_uri = storage.uri(rel)
        model.load_state_dict(state)
        step, batches, bad_total = train_state["step"], train_state["batches"], train_state["skipped_steps"]
        if info.is_main:
            log(f"{task.name}: resuming from step {step} ({existing_uri})")
    if step >= cfg.max_steps:
        if info.is_main:
            log(f"{task.name}: already at step {step} >= max_steps {cfg.max_steps}; nothing to do")
        return existing_uri

    # Every rank starts from identical weights (seeded); the noise of each step differs per rank.
    wrapped = _wrap(model, cfg, info)
    if cfg.compile:
        _compile(wrapped, info.device, task.name, log if info.is_main else (lambda m: None))
    groups = task.optimizer_groups(model, cfg.weight_decay)
    fused = not cfg.fsdp and info.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    # Made before the RNG is seeded or restored: starting a DataLoader iterator draws from torch's
    # generator, and that draw must not shift the noise of a resumed run.
    dataset = task.dataset(cfg.batch_size, cfg.seed, batches, info.rank, info.world_size)
    batch_iter = iter(make_loader(dataset, num_workers=cfg.num_workers))
    if train_state is not None:
        set_optimizer_state_dict(wrapped, optimizer, train_state["optimizer"], options=_state_options())
        scheduler.load_state_dict(train_state["scheduler"])
        rngs = train_state["rng"]
        if len(rngs) == info.world_size:
            ckpt.set_rng_state(rngs[info.rank])
        else:
            torch.manual_seed(cfg.seed + 1000 * step + info.rank)
            if info.is_main:
                log(f"{task.name}: checkpoint had {len(rngs)} processes, now {info.world_size}: RNG reseeded")
    else:
        torch.manual_seed(cfg.seed + 1 + info.rank)

    autocast = _autocast(cfg, info.device)
    params = [p for p in model.parameters() if p.requires_grad]
    # Model FLOPs utilisation, where the model can count its FLOPs (dalle.models.transformer) and the
    # device's peak is known; the achieved model FLOP/s is logged either way.
    flops_per_sample = model.flops_per_sample() if hasattr(model, "flops_per_sample") else None
    peak, peak_source = peak_flops(cfg, info.device)
    if info.is_main and flops_per_sample is not None:
        log(
            f"{task.name}: mfu against {peak:.3g} FLOP/s ({peak_source})"
            if peak
            else f"{task.name}: no mfu: {peak_source}"
        )
    bad_in_row, last_saved = 0, step
    window_start, window_steps, sums = time.perf_counter(), 0, {}

    def save() -> str:
        nonlocal last_saved
        model_state = get_model_state_dict(wrapped, options=_state_options())
        optim_state = get_optimizer_state_dict(wrapped, optimizer, options=_state_options())
        rngs = gather_objects(ckpt.rng_state(), info)
        # Every rank reports a checksum of its weights: DDP/FSDP must keep them identical.
        checksums = [] if cfg.fsdp else gather_objects(_weights_checksum(model.state_dict()), info)
        if len(set(checksums)) > 1:
            raise RuntimeError(f"{task.name}: the ranks' weights differ at step {step}: {checksums}")
        uri = storage.uri(checkpoint_dir(task.name, step))
        if info.is_main:
            rel = checkpoint_dir(task.name, step)
            train_state = ckpt.train_state_bytes(
                {
                    "step": step,
                    "batches": batches,
                    "skipped_steps": bad_total,
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs,
                    "world_size": info.world_size,
                    "rank_weight_checksums": checksums,
                }
            )
            # model.json last, with the sha256 of every file: a damaged file is found on resume.
            files = {CHECKPOINT_TRAIN_STATE: train_state, CHECKPOINT_CONFIG: dump_config(run_cfg).encode()}
            save_model(storage, rel, model_state, meta, files)
            metrics.flush(force=True)
            uri = set_latest(storage, task.name, step)
            log(f"{task.name}: checkpoint at step {step}: {uri}")
            if on_checkpoint is not None:
                on_checkpoint({"model": task.name, "step": step, "uri": uri, "metrics": last_record})
        barrier(info)
        last_saved = step
        return uri

    last_record: dict[str, Any] = {}
    uri = existing_uri
    wrapped.train()
    check_available(run_cfg.dashboards)  # every rank: a missing package stops all, not rank 0 alone
    metrics = MetricsLog(storage, task.name, step) if info.is_main else None
    sinks = (
        open_sinks(storage, run_cfg.dashboards, task.name, default_run_name(storage, task.name), log=log)
        if info.is_main
        else None
    )
    try:
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            loss_sum, step_metrics = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch = next(batch_iter)
                batches += 1
                batch = {
                    k: v.to(info.device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in batch.items()
                }
                last_micro = micro == cfg.grad_accum - 1
                sync = (
                    contextlib.nullcontext()
                    if last_micro or not hasattr(wrapped, "no_sync")
                    else wrapped.no_sync()
                )
                with sync:
                    with autocast:
                        loss, parts = task.loss(wrapped, batch, step)
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) / cfg.grad_accum
                for key, value in parts.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + float(value) / cfg.grad_accum
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
            if not all_agree(math.isfinite(loss_sum) and math.isfinite(grad_norm), info):
                bad_in_row += 1
                bad_total += 1
                optimizer.zero_grad(set_to_none=True)
                if info.is_main:
                    log(f"{task.name}: step {step + 1} skipped: loss {loss_sum}, gradient norm {grad_norm}")
                if bad_in_row >= cfg.max_bad_steps:
                    raise TrainingDiverged(
                        f"{task.name}: {bad_in_row} steps in a row had a NaN/Inf loss or gradient "
                        f"(last loss {loss_sum}); "
                        f"lower train lr (now {cfg.lr}) or check the data; the last good checkpoint is kept"
                    )
                continue
            bad_in_row = 0
            optimizer.step()
            task.after_step(model)
            scheduler.step()
            step += 1
            window_steps += 1
            for key, value in {"loss": loss_sum, "grad_norm": grad_norm, **step_metrics}.items():
                sums[key] = sums.get(key, 0.0) + value
            if info.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                elapsed = time.perf_counter() - window_start
                samples = window_steps * cfg.batch_size * cfg.grad_accum * info.world_size
                last_record = {
                    "model": task.name,
                    "step": step,
                    **{key: value / window_steps for key, value in sums.items()},
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": samples / elapsed,
                    "tokens_per_s": samples * task.tokens_per_sample / elapsed,
                    **_utilisation(flops_per_sample, samples / elapsed / info.world_size, peak),
                    "skipped_steps": bad_total,
                    "time": time.time(),
                }
                metrics.add(last_record)
                metrics.flush()
                sinks.write(last_record)
                if on_metrics is not None:
                    on_metrics(last_record)
                window_start, window_steps, sums = time.perf_counter(), 0, {}
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                uri = save()
        if last_saved != step:
            uri = save()
        return uri
    finally:
        if sinks is not None:
            sinks.close()  # uploads the event files, also when training failed
