"""The discrete VAE of stage one: an image becomes a grid of codes and back.

Following the paper (Ramesh et al. 2021, appendix A): the encoder is groups of bottleneck
residual blocks separated by max-pooling and ends in a 1x1 convolution to one logit per
code; the decoder starts with a 1x1 convolution from a (relaxed) one-hot code, so that
convolution's weight is the codebook, and upsamples by nearest neighbour. Training uses
the gumbel-softmax relaxation with a cosine-annealed temperature, a KL term toward the
uniform prior with a warmed-up weight, and the logit-Laplace likelihood (or MSE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dalle.config import DVAEConfig


class BottleneckBlock(nn.Module):
    """Residual block: 3x3, 3x3, 3x3, 1x1 at a quarter of the width, scaled by a post-gain."""

    def __init__(self, in_channels: int, out_channels: int, post_gain: float):
        super().__init__()
        hidden = max(out_channels // 4, 1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )
        self.residual = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1),
        )
        # The paper scales each residual branch by 1 / (number of blocks)^2 so that a deep
        # stack starts close to the identity.
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.post_gain * self.residual(x)


def _group_widths(cfg: DVAEConfig) -> list[int]:
    return [cfg.hidden_width * 2**g for g in range(cfg.downsample_steps + 1)]


def _residual_groups(
    cfg: DVAEConfig, widths: list[int], resample: Callable[[], nn.Module]
) -> list[nn.Module]:
    """One group of blocks per width (starting from widths[0] channels), `resample()` between groups."""
    gain = 1.0 / (len(widths) * cfg.blocks_per_group) ** 2
    layers: list[nn.Module] = []
    channels = widths[0]
    for g, width in enumerate(widths):
        for _ in range(cfg.blocks_per_group):
            layers.append(BottleneckBlock(channels, width, gain))
            channels = width
        if g < len(widths) - 1:
            layers.append(resample())
    return layers


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = _group_widths(cfg)
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 7, padding=3)]
        layers += _residual_groups(cfg, widths, lambda: nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(widths[-1], cfg.codebook_size, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = list(reversed(_group_widths(cfg)))
        # The codebook: a 1x1 convolution applied to a (relaxed) one-hot grid.
        self.codebook = nn.Conv2d(cfg.codebook_size, widths[0], 1)
        # Unit-scale code vectors: with the default fan-in init (1/sqrt(codebook_size)) every
        # code looks alike to the decoder at first, the encoder gets no signal about which
        # code to pick, and training collapses onto a handful of codes.
        nn.init.normal_(self.codebook.weight, std=1.0)
        nn.init.zeros_(self.codebook.bias)
        layers = _residual_groups(cfg, widths, lambda: nn.Upsample(scale_factor=2, mode="nearest"))
        out_channels = 6 if cfg.reconstruction == "logit_laplace" else 3
        layers += [nn.ReLU(), nn.Conv2d(widths[-1], out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward_soft(self, soft_one_hot: torch.Tensor) -> torch.Tensor:
        return self.net(self.codebook(soft_one_hot))

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        # A lookup of the 1x1 convolution's columns equals the convolution of a one-hot grid.
        weight = self.codebook.weight[:, :, 0, 0].t()  # (codebook_size, width)
        embedded = F.embedding(codes, weight) + self.codebook.bias  # (B, h, w, width)
        return self.net(embedded.permute(0, 3, 1, 2))  # a channels-last view, as the convolutions prefer


@dataclass
class DVAELoss:
    """One training step's objective and its parts (detached floats except `loss`)."""

    loss: torch.Tensor
    reconstruction: float
    kl: float
    kl_weight: float
    usage_kl: float  # KL of the batch's average code distribution to uniform
    temperature: float
    codes: torch.Tensor  # argmax codes of the batch, for codebook usage


def gumbel_temperature(cfg: DVAEConfig, step: int) -> float:
    """Cosine annealing from temperature_start to temperature_end over temperature_anneal_steps."""
    progress = min(step / cfg.temperature_anneal_steps, 1.0)
    return cfg.temperature_end + 0.5 * (cfg.temperature_start - cfg.temperature_end) * (
        1 + math.cos(math.pi * progress)
    )


def kl_weight(cfg: DVAEConfig, step: int) -> float:
    """Beta, rising linearly from 0 to kl_weight over kl_warmup_steps."""
    if cfg.kl_warmup_steps == 0:
        return cfg.kl_weight
    return cfg.kl_weight * min(step / cfg.kl_warmup_steps, 1.0)


class DiscreteVAE(nn.Module):
    """Images in [0, 1], shape (B, 3, S, S) <-> codes, shape (B, S/2^k, S/2^k), in [0, codebook_size)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Convolutions run about 1.4x faster on the CPU (oneDNN) with channels-last tensors.
        self.to(memory_format=torch.channels_last)

    @property
    def grid(self) -> int:
        return self.cfg.grid

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(
                f"expected images of shape (batch, 3, {size}, {size}), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floats in [0, 1], got dtype {images.dtype}; divide bytes by 255"
            )
        low, high = float(images.min()), float(images.max())
        if not (low >= 0.0 and high <= 1.0):  # also true for NaN
            raise ValueError(f"images must lie in [0, 1], got values in [{low}, {high}]")

    def _squeeze(self, images: torch.Tensor) -> torch.Tensor:
        # The logit-Laplace likelihood lives on (0, 1): map [0, 1] into [eps, 1 - eps].
        eps = self.cfg.logit_laplace_eps
        return (1 - 2 * eps) * images + eps

    def _to_pixels(self, decoded: torch.Tensor) -> torch.Tensor:
        if self.cfg.reconstruction == "logit_laplace":
            eps = self.cfg.logit_laplace_eps
            return ((torch.sigmoid(decoded[:, :3]) - eps) / (1 - 2 * eps)).clamp(0, 1)
        return decoded.clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes by argmax of the encoder's logits (no gumbel noise): (B, grid, grid) int64."""
        self._check_images(images)
        return self.encoder(self._encoder_input(images)).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from codes of shape (B, grid, grid) or (B, grid*grid)."""
        if codes.ndim == 2:
            codes = codes.view(codes.shape[0], self.grid, self.grid)
        if codes.min() < 0 or codes.max() >= self.cfg.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {self.cfg.codebook_size}), got [{codes.min()}, {codes.max()}]"
            )
        return self._to_pixels(self.decoder.forward_codes(codes.long()))

    def _encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        # Centre the input; the encoder sees the same squeezed pixels the likelihood scores.
        x = self._squeeze(images) if self.cfg.reconstruction == "logit_laplace" else images
        return (x - 0.5).contiguous(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor, step: int) -> DVAELoss:
        """The training objective at `step` (which sets the temperature and the KL weight)."""
        self._check_images(images)
        logits = self.encoder(self._encoder_input(images))  # (B, K, h, w)
        tau = gumbel_temperature(self.cfg, step)
        soft_one_hot = F.gumbel_softmax(logits.float(), tau=tau, dim=1)
        decoded = self.decoder.forward_soft(soft_one_hot.to(logits.dtype)).float()

        if self.cfg.reconstruction == "logit_laplace":
            reconstruction = _logit_laplace_nll(self._squeeze(images), decoded[:, :3], decoded[:, 3:]).mean()
        else:
            reconstruction = F.mse_loss(decoded, images)

        log_q = F.log_softmax(logits.float(), dim=1)
        kl_per_code = (log_q.exp() * (log_q + math.log(self.cfg.codebook_size))).sum(dim=1)  # (B, h, w)
        # The paper's ELB sums the reconstruction over every pixel value and the KL over every
        # code; we average the reconstruction per pixel value, so the KL is averaged over the
        # same count (codes / pixel values = grid^2 / (3 S^2)) and beta keeps the paper's meaning.
        codes_per_value = self.grid**2 / (3 * self.cfg.image_size**2)
        kl = kl_per_code.mean() * codes_per_value
        beta = kl_weight(self.cfg, step)
        # Against codebook collapse. At a high learning rate the encoder's logits outgrow the gumbel
        # noise within a few dozen steps, long before the temperature falls: each input is then
        # committed to whichever code led at that moment, and a code that lost gets no gradient
        # through the saturated softmax. Two inputs that started close keep sharing one code, and
        # which ones do is decided by float order. The paper's KL is per code (and warmed up from
        # 0, so absent at that moment); this term is the KL of the batch's *average* posterior to
        # uniform, which is large exactly when many inputs pile onto few codes (wav2vec 2.0's
        # diversity loss) and leaves each input free to be confident about its own code.
        mean_q = log_q.exp().mean(dim=(0, 2, 3))
        usage_kl = (mean_q * (mean_q.clamp(min=1e-12).log() + math.log(self.cfg.codebook_size))).sum()
        return DVAELoss(
            loss=reconstruction + beta * kl + self.cfg.usage_weight * usage_kl,
            reconstruction=float(reconstruction.detach()),
            kl=float(kl.detach()),
            kl_weight=beta,
            usage_kl=float(usage_kl.detach()),
            temperature=tau,
            codes=logits.detach().argmax(dim=1),
        )


def _logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Negative log density of the logit-Laplace distribution at x in (0, 1), per value."""
    log_b = log_b.clamp(min=-7.0, max=7.0)
    logit_x = torch.log(x) - torch.log1p(-x)
    return math.log(2.0) + log_b + torch.log(x * (1 - x)) + (logit_x - mu).abs() * torch.exp(-log_b)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Perplexity of the codes' distribution and the share of the codebook they use (collapse shows as both fall)."""
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {
        "codebook_perplexity": float(entropy.exp()),
        "codebook_used_share": float((counts > 0).float().mean()),
    }
