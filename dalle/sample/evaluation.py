"""Evaluation plug-ins: prompt sections a gallery adds, scored by the plug-in after sampling.

`gallery.evaluator` names a Python module (e.g. `demo.evaluation`) with a function
`evaluator(cfg: RunConfig) -> Evaluator`. The library knows nothing else about it, so a world
with its own ground truth (the demo's shapes) plugs in without the library depending on it.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from dalle.config import ConfigError, RunConfig


class Evaluator(Protocol):
    def prompt_groups(self) -> list[tuple[str, str, list[str]]]:
        """(key, title, prompts) of each section to sample; `key` names the section in the figures."""
        ...

    def evaluate(self, sections: list, clip: Any) -> dict:
        """Figures for the drawn sections (gallery Sections with PromptSamples), as reports/eval.json holds them."""
        ...


def load_evaluator(cfg: RunConfig) -> Evaluator | None:
    """The evaluator `gallery.evaluator` names, or None when it is unset."""
    name = cfg.gallery.evaluator
    if not name:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(
            f"gallery.evaluator {name!r} cannot be imported ({err}); install the plug-in or set gallery.evaluator: null"
        ) from None
    factory = getattr(module, "evaluator", None)
    if not callable(factory):
        raise ConfigError(f"gallery.evaluator {name!r} has no function evaluator(cfg) returning an Evaluator")
    return factory(cfg)
