"""Decoding: the vectorised trie-constrained beam search."""

from bear_ds.generation.beam import BeamResult, constrained_beam_search

__all__ = ["BeamResult", "constrained_beam_search"]
