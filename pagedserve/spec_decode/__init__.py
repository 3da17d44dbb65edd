"""Speculative decoding: draft proposers (n-gram, suffix matching) and their metrics."""
