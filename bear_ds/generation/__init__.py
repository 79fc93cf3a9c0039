"""Decoding: the vectorised trie-constrained beam search and its left-padded prompt batches."""

from bear_ds.generation.beam import BeamResult, constrained_beam_search, left_pad

__all__ = ["BeamResult", "constrained_beam_search", "left_pad"]
