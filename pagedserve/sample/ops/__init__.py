"""Batched logits transforms used by the Sampler; every op works on a [num_reqs, vocab] tensor."""
