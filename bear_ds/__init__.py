"""bear_ds: beam-search-aware fine-tuning (BEAR) of LLM recommenders, at scale."""

__version__ = "0.1.0"
