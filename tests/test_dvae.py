"""The discrete VAE: objective, schedules, codebook usage and reconstructions of the demo shapes."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle.config import ConfigError, DVAEConfig, config_from_dict
from dalle.models.dvae import (
    DiscreteVAE,
    _logit_laplace_nll,
    codebook_usage,
    gumbel_temperature,
    kl_weight,
)
from demo.world import BACKGROUND, COLORS, WorldConfig, generate_samples

TINY = DVAEConfig(image_size=16, downsample_steps=2, codebook_size=32, hidden_width=8)


def test_round_trip_shapes_and_range():
    torch.manual_seed(0)
    model = DiscreteVAE(TINY).eval()
    images = torch.rand(3, 3, 16, 16)
    codes = model.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 32
    assert torch.equal(codes, model.encode(images)), "encoding takes the argmax: no noise"
    decoded = model.decode(codes)
    assert decoded.shape == (3, 3, 16, 16)
    assert decoded.min() >= 0 and decoded.max() <= 1
    assert torch.equal(model.decode(codes.flatten(1)), decoded)


@pytest.mark.parametrize("reconstruction", ["logit_laplace", "mse"])
def test_bad_images_and_codes_are_named(reconstruction):
    model = DiscreteVAE(TINY.model_copy(update={"reconstruction": reconstruction}))
    with pytest.raises(ValueError, match="expected images of shape \\(batch, 3, 16, 16\\)"):
        model.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="images must lie in \\[0, 1\\]"):
        model(torch.rand(2, 3, 16, 16) * 255, step=0)
    with pytest.raises(ValueError, match="images must lie in"):
        model.encode(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="divide bytes by 255"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes must lie in \\[0, 32\\)"):
        model.decode(torch.full((1, 4, 4), 32))


def test_image_size_must_divide_into_the_grid():
    with pytest.raises(ConfigError, match="not divisible by 2\\*\\*downsample_steps"):
        config_from_dict({"dvae": {"image_size": 60, "downsample_steps": 3}})
    assert DVAEConfig(image_size=256, downsample_steps=3).grid == 32  # the paper's 32x32 grid


def test_temperature_anneals_on_a_cosine_from_one_to_a_sixteenth():
    cfg = DVAEConfig(temperature_anneal_steps=1000)
    taus = [gumbel_temperature(cfg, step) for step in range(0, 1201, 100)]
    assert taus[0] == 1.0
    assert taus[10] == pytest.approx(1 / 16) and taus[12] == pytest.approx(1 / 16)
    assert all(a > b for a, b in itertools.pairwise(taus[:11]))
    assert taus[5] == pytest.approx((1 + 1 / 16) / 2)  # the cosine's midpoint


def test_kl_weight_warms_up_linearly():
    cfg = DVAEConfig(kl_weight=6.6, kl_warmup_steps=500)
    assert kl_weight(cfg, 0) == 0
    assert kl_weight(cfg, 250) == pytest.approx(3.3)
    assert kl_weight(cfg, 500) == kl_weight(cfg, 10_000) == pytest.approx(6.6)


def test_logit_laplace_is_a_laplace_in_logit_space():
    x = torch.tensor([0.1, 0.3, 0.5, 0.85])
    mu = torch.tensor([0.0, -1.0, 0.5, 2.0])
    log_b = torch.tensor([0.0, -1.0, 0.3, -2.0])
    laplace = torch.distributions.Laplace(mu, log_b.exp())
    logit = torch.log(x / (1 - x))
    # Change of variables: p(x) = Laplace(logit x) * |d logit x / dx| = Laplace(logit x) / (x (1 - x)).
    expected = -(laplace.log_prob(logit) - torch.log(x * (1 - x)))
    torch.testing.assert_close(_logit_laplace_nll(x, mu, log_b), expected)


def test_kl_is_zero_for_uniform_codes_and_weighted_per_pixel_value():
    model = DiscreteVAE(TINY)
    with torch.no_grad():
        model.encoder.net[-1].weight.zero_()
        model.encoder.net[-1].bias.zero_()
    out = model(torch.rand(2, 3, 16, 16), step=10_000)
    assert out.kl == pytest.approx(0.0, abs=1e-6)
    assert out.kl_weight == TINY.kl_weight


def test_codebook_usage_shows_collapse():
    spread = codebook_usage(torch.arange(64) % 16, 16)
    assert spread["codebook_perplexity"] == pytest.approx(16) and spread["codebook_used_share"] == 1.0
    collapsed = codebook_usage(torch.zeros(64, dtype=torch.long), 16)
    assert collapsed["codebook_perplexity"] == pytest.approx(1) and collapsed["codebook_used_share"] == 1 / 16


@pytest.mark.learning
def test_a_tiny_dvae_overfits_one_batch(learning_seed):
    torch.manual_seed(learning_seed)
    cfg = TINY.model_copy(update={"reconstruction": "mse", "kl_weight": 0.0, "temperature_anneal_steps": 200})
    model = DiscreteVAE(cfg)
    # Four flat demo colours: each image needs its own code. A collapsed codebook shares one code
    # between two colours and decodes both to their mean (MSE 0.017-0.026, worst pixel 0.3-0.4).
    names = ["red", "green", "blue", "yellow"]
    colours = torch.tensor([COLORS[n] for n in names], dtype=torch.float32).view(4, 3, 1, 1) / 255
    images = colours.expand(4, 3, 16, 16).contiguous()
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-3)
    for step in range(800):
        out = model(images, step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    codes = model.eval().encode(images)
    assert len({int(c) for c in codes[:, 0, 0]}) == 4, f"one code per colour, got {codes[:, 0, 0].tolist()}"
    # Border positions see the zero padding and may take codes of their own, less trained ones: a
    # pixel there can be 0.09 off (seen on one seed of 60). The mean is what a shared code moves:
    # over 60 runs (seeds, kernel paths) the worst MSE was 5e-4, a collapsed codebook 0.017-0.026.
    error = F.mse_loss(model.decode(codes), images)
    assert error < 1e-3, f"reconstruction MSE {error:.5f} ({out})"


def test_the_usage_term_is_the_kl_of_the_average_code_distribution_to_uniform():
    model = DiscreteVAE(TINY)
    with torch.no_grad():  # every position certain of code 3: the batch uses one code of 32
        model.encoder.net[-1].weight.zero_()
        model.encoder.net[-1].bias.zero_()
        model.encoder.net[-1].bias[3] = 100.0
    assert model(torch.rand(2, 3, 16, 16), step=0).usage_kl == pytest.approx(math.log(32), rel=1e-4)
    with torch.no_grad():
        model.encoder.net[-1].bias.zero_()
    assert model(torch.rand(2, 3, 16, 16), step=0).usage_kl == pytest.approx(0.0, abs=1e-6)


# ----- the demo shapes --------------------------------------------------------------------


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255


def object_colour(reconstruction: torch.Tensor, original: torch.Tensor) -> str:
    """Nearest demo colour to the reconstruction's most saturated half of the object's pixels."""
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None] / 255
    inside = (original.flatten(1) - background).abs().sum(0) > 0.3
    pixels = reconstruction.flatten(1)[:, inside]
    distance = (pixels - background).abs().sum(0)
    colour = pixels[:, distance >= distance.median()].mean(1)
    names = list(COLORS)
    palette = torch.tensor([COLORS[n] for n in names], dtype=torch.float32) / 255
    return names[int(((palette - colour) ** 2).sum(1).argmin())]


@pytest.mark.learning
def test_reconstructions_of_demo_shapes_keep_the_colour(learning_seed):
    source = WorldConfig(num_images=600, image_size=32, pair_fraction=0.0, heldout=[])
    samples = generate_samples(source)
    images = torch.tensor(np.stack([_pixels(s.image) for s in samples])).permute(0, 3, 1, 2)
    train, test = images[:500], images[500:]
    steps = 500  # about 45 s on two cores
    cfg = DVAEConfig(  # the demo's objective (MSE, a light KL), scaled down
        image_size=32,
        downsample_steps=2,
        codebook_size=128,
        hidden_width=32,
        reconstruction="mse",
        kl_weight=0.02,
        temperature_anneal_steps=steps,
        kl_warmup_steps=steps // 5,
    )
    torch.manual_seed(learning_seed)
    model = DiscreteVAE(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-3)
    g = torch.Generator().manual_seed(learning_seed)
    for step in range(steps):
        out = model(train[torch.randint(0, len(train), (32,), generator=g)], step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    reconstructions = model.decode(model.encode(test))
    right = [
        object_colour(r, x) == s.objects[0].color for r, x, s in zip(reconstructions, test, samples[500:])
    ]
    assert np.mean(right) >= 0.8, f"object colour right in {np.mean(right):.0%} of held-out images"
    usage = codebook_usage(model.encode(test), cfg.codebook_size)
    # Measured on four seeds: 33-41% of the codes in use. Without the usage term 12-13%, where
    # orange and yellow shared codes (colour right 85-90%), and 2-6% with the paper's objective.
    assert usage["codebook_used_share"] > 0.2, usage
    assert math.isfinite(out.loss.item())
