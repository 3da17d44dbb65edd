"""CPU attention whose decodes read K/V straight from the paged cache in a small C++ kernel.

The gather + SDPA path of CPU_SDPA copies every decode's whole KV into a padded tensor each
layer and reads it again: about 4x the bytes the attention needs, on a step that is bound by
memory bandwidth. The kernel here walks each request's block table instead and reads every K and
V row once, for all query heads of a KV head at a time (grouped-query attention without repeat):

    for each (request r, KV head h), spread over the torch threads:
        pass 1: s[g, t] = scale * q[r, h*G + g] . K[block_table[r, t // bs], t % bs, h]
        softmax over t in [max(0, seq_len - window), seq_len)  (float32)
        pass 2: out[r, h*G + g] = sum_t p[g, t] * V[block_table[r, t // bs], t % bs, h]

With AVX-512 and a head size in {32, 64, 80, 96, 128, 256}, keys go 16 at a time (one
transpose-add turns 16 dot-product vectors into 16 scores), rows a few blocks ahead are
prefetched (blocks are scattered, so the hardware prefetcher cannot follow), and bf16/fp16 rows
are widened once per chunk; otherwise plain loops run. Accumulation is float32 throughout.

The kernel is built on first use (pagedserve.kernels.build: ~10-20 s, then cached per source,
flags, torch version and CPU). Without a working C++ compiler the backend is not selected and
CPU_SDPA runs instead; prefill chunks always run through SDPA (CpuSdpaBackend).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from pagedserve.attention.backends.abstract import register_backend
from pagedserve.attention.backends.cpu_sdpa import CpuSdpaBackend, CpuSdpaMetadata
from pagedserve.kernels.build import load_op, read_sources

_EXTENSION_NAME = "pagedserve_cpu_paged_attention"


@functools.cache
def load_decode_kernel() -> Any | None:
    """The compiled `paged_decode_attention` op, or None when it cannot be built here.

    Set PAGEDSERVE_CPU_ATTENTION_KERNEL=0 to never use it.
    """
    return load_op(
        "pagedserve_cpu",
        "paged_decode_attention",
        _EXTENSION_NAME,
        read_sources("cpu_math.h", "paged_attention.cpp"),
        switch="PAGEDSERVE_CPU_ATTENTION_KERNEL",
        what="CPU paged-attention kernel",
    )


@register_backend
class CpuPagedBackend(CpuSdpaBackend):
    name = "CPU_PAGED"

    def __init__(self) -> None:
        kernel = load_decode_kernel()
        if kernel is None:
            raise RuntimeError("CPU_PAGED needs the C++ decode kernel, which could not be built")
        self._kernel = kernel

    def _decode(
        self,
        q: torch.Tensor,
        out: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: CpuSdpaMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> None:
        if key_cache.dtype != q.dtype:  # the kernel reads caches of the query's dtype only
            super()._decode(q, out, key_cache, value_cache, metadata, scale, sliding_window)
            return
        self._kernel(
            out,
            q,
            metadata.decode_token_indices,
            key_cache,
            value_cache,
            metadata.decode_block_table,
            metadata.decode_seq_lens,
            scale,
            sliding_window or 0,
        )
