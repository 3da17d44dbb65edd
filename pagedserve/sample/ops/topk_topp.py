"""Min-p, top-k and top-p filtering and the exponential-race random sampler."""

from __future__ import annotations

import torch


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Masks in place every token whose probability is below `min_p` times the row's largest."""
    probs = torch.softmax(logits, dim=-1)
    max_probs = probs.amax(dim=-1, keepdim=True)
    logits.masked_fill_(probs < min_p.unsqueeze(1) * max_probs, float("-inf"))


def apply_top_k_only(logits: torch.Tensor, k: torch.Tensor) -> None:
    """Keeps in place each row's k largest logits (plus any tied with the k-th); no full sort."""
    max_top_k = int(k.max())
    top_values = logits.topk(max_top_k, dim=-1).values
    kth_values = top_values.gather(1, (k - 1).unsqueeze(1))
    logits.masked_fill_(logits < kth_values, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Returns logits with everything outside each row's top-k and top-p set masked to -inf.

    Top-p keeps the smallest set of most likely tokens whose mass reaches p (after top-k); the
    most likely token is always kept. Uses `topk` when only top-k is asked, a sort otherwise.
    """
    if p is None:
        if k is not None:
            apply_top_k_only(logits, k)
        return logits

    vocab_size = logits.shape[1]
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        # Ascending order: the k-th largest sits at index vocab_size - k.
        kth_values = logits_sort.gather(1, (vocab_size - k).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < kth_values, float("-inf"))

    probs_sort = logits_sort.softmax(dim=-1)
    probs_cumsum = probs_sort.cumsum(dim=-1)
    # A token goes when it and everything less likely hold at most 1 - p of the mass.
    top_p_mask = probs_cumsum <= 1 - p.unsqueeze(1)
    top_p_mask[:, -1] = False
    logits_sort.masked_fill_(top_p_mask, float("-inf"))
    return logits.scatter_(1, logits_idx, logits_sort)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Samples one token per row from `probs` ([num_reqs, vocab], rows sum to 1) in place.

    argmax(p / E) with E ~ Exponential(1) picks token i with probability p_i (an exponential
    race) and needs no cumulative sum. Seeded rows draw E only from their own generator, so
    their tokens do not depend on the rest of the batch; the others share one global draw.
    """
    noise = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        noise.exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    # NOTE: exponential_ can return exactly 0; 0/0 = NaN would win the argmax and pick a
    # zero-probability (masked) token, so keep the noise strictly positive.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)
