"""Sampling: generating image codes, CLIP reranking and galleries."""
