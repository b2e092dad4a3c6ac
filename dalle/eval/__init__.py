"""Evaluation: the pixel-level detector that scores generated demo images against their prompts."""
