"""The torch device a setting names, checked once for every stage that computes."""

from __future__ import annotations

import torch

from dalle.config import ConfigError


def resolve_device(name: str, local_rank: int = 0, setting: str = "device") -> torch.device:
    """'auto' is cuda (cuda:<local rank> under torchrun) when CUDA is available, else cpu.
    `setting` names the configuration key in errors, e.g. "clip.device"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"{setting} {name!r} is not a torch device ({err}); use auto, cpu or cuda"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting} is {name!r} but torch sees no CUDA device; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
