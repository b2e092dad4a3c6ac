"""`dalle plan`: model sizes counted from our own code, figures that scale as they must, and a
command line that names bad values before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dalle.config import RunConfig, with_changes
from dalle.errors import UserError
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer
from dalle.plan import (
    dvae_encode_flops,
    model_shapes,
    plan,
    throughputs,
    transformer_shape,
    transformer_train_flops_per_token,
)

# A model big enough that the output heads are a small share, small enough for a CPU test.
MID = with_changes(
    RunConfig(),
    "test",
    dvae={**RunConfig().dvae.model_dump(), "image_size": 64, "downsample_steps": 2, "codebook_size": 512},
    transformer={
        **RunConfig().transformer.model_dump(),
        "width": 256,
        "depth": 4,
        "heads": 4,
        "text_seq_len": 32,
    },
    tokenizer={**RunConfig().tokenizer.model_dump(), "vocab_size": 1000},
)


def test_the_transformer_counted_on_the_meta_device_is_the_one_trained():
    shape = transformer_shape(MID)
    grid = MID.dvae.image_size // 2**MID.dvae.downsample_steps
    model = DalleTransformer(MID.transformer, MID.tokenizer.vocab_size, MID.dvae.codebook_size, grid)
    assert shape["params"] == sum(p.numel() for p in model.parameters())
    assert shape["seq_len"] == MID.transformer.text_seq_len + grid * grid

    # 6 FLOPs per parameter and token plus dense attention: within 5% of torch's own count of a
    # training step (forward and backward) of the real model.
    text = torch.randint(1, 100, (1, shape["text_len"]))
    codes = torch.randint(0, MID.dvae.codebook_size, (1, shape["codes"]))
    # The math kernel of attention is made of matrix products the counter sees (the fused CPU kernel it misses).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(text, codes).loss.backward()
    counted = counter.get_total_flops() / shape["seq_len"]
    assert transformer_train_flops_per_token(shape) == pytest.approx(counted, rel=0.05)


def test_the_dvae_flops_counted_on_the_meta_device_equal_a_real_forward():
    model = DiscreteVAE(MID.dvae)
    with FlopCounterMode(display=False) as counter:
        model.encoder(torch.rand(1, 3, 64, 64))
    assert dvae_encode_flops(MID) == counter.get_total_flops() > 0


@pytest.fixture(scope="module")
def shapes():
    return model_shapes(MID)


def _lines(result: dict) -> dict[tuple[str, str], float]:
    return {(line["stage"], line["what"]): line["value"] for line in result["lines"]}


def test_storage_and_compute_grow_with_the_pairs_and_gpus_share_the_training(shapes):
    small = _lines(plan(MID, 1_000_000, 8, shapes=shapes))
    large = _lines(plan(MID, 400_000_000, 8, shapes=shapes))
    wide = _lines(plan(MID, 400_000_000, 64, shapes=shapes))
    for key in [("storage", "raw shards (crawl)"), ("crawl", "node-hours"), ("embed", "GPU-hours"),
                ("tokenize", "GPU-hours"), ("train_transformer", "GPU-days")]:  # fmt: skip
        assert large[key] == pytest.approx(400 * small[key])
    assert wide[("train_transformer", "GPU-days")] == large[("train_transformer", "GPU-days")]
    assert wide[("train_transformer", "days on 64 GPUs")] == pytest.approx(
        large[("train_transformer", "GPU-days")] / 64
    )
    # A checkpoint does not grow with the data.
    assert (
        large[("storage", "one transformer checkpoint (weights and AdamW state)")]
        == small[("storage", "one transformer checkpoint (weights and AdamW state)")]
    )
    # The crawl: the published URLs per node-second, all of them.
    rate = throughputs()["crawl_urls_per_node_s"].value
    assert small[("crawl", "node-hours")] == pytest.approx(1_000_000 / rate / 3600)
    # Past one node's memory the dedup index is sharded over more nodes.
    assert small[("dedup", "nodes if sharded by coarse cluster")] == 1
    huge = _lines(plan(MID, 400_000_000, 8, overrides={"dedup_node_memory_bytes": 64e9}, shapes=shapes))
    assert huge[("dedup", "nodes if sharded by coarse cluster")] > 1


def test_a_replaced_figure_says_so_and_a_bad_one_is_refused(shapes):
    result = plan(MID, 3_000_000, 8, overrides={"mfu_train": 0.2}, shapes=shapes)
    base = plan(MID, 3_000_000, 8, shapes=shapes)
    assert result["throughputs"]["mfu_train"]["basis"] == "given"
    assert _lines(result)[("train_transformer", "GPU-days")] == pytest.approx(
        2 * _lines(base)[("train_transformer", "GPU-days")]
    )
    with pytest.raises(UserError, match="no such figure"):
        plan(MID, 3_000_000, 8, overrides={"mfu": 0.2}, shapes=shapes)
    with pytest.raises(UserError, match="a share lies in"):
        plan(MID, 3_000_000, 8, overrides={"download_success": 2}, shapes=shapes)
    with pytest.raises(UserError, match="--gpus"):
        plan(MID, 3_000_000, 0, shapes=shapes)


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], check=False, capture_output=True, text=True, timeout=300
    )


def test_the_command_plans_several_sizes_and_names_a_bad_value_first():
    done = run_plan("--json", "plan", "--pairs", "1M,400M", "--gpus", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    plans = json.loads(done.stdout)["plans"]
    assert [p["pairs"] for p in plans] == [1_000_000, 400_000_000]
    assert plans[0]["transformer"]["seq_len"] == 256 + 32 * 32  # configs/laion.yaml: the paper's grid
    text = run_plan("plan", "--pairs", "3M")
    assert text.returncode == 0 and "[published: img2dataset's README" in text.stdout
    for args, message in [
        (["--pairs", "3X"], "must be pair counts"),
        (["--pairs", "3M", "--set", "mfu=0.3"], "no such figure"),
        (["--pairs", "3M", "--set", "mfu_train"], "expected NAME=NUMBER"),
        (["--pairs", "3M", "--epochs", "0"], "--epochs must be a positive number"),
    ]:
        bad = run_plan("plan", *args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
