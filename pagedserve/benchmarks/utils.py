"""Helpers shared by the benchmarks: model shortcuts, a tiny random checkpoint, FLOP accounting
and the machine's GEMM rate (the compute limit every throughput figure is reported against)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

TINY = "tiny"
SMOLLM2 = "smollm2"

# A Llama small enough that the CPU work around the forward pass dominates a step.
TINY_LLAMA_CONFIG = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def make_tiny_llama_checkpoint(directory: str, seed: int = 0, **overrides: object) -> str:
    """Writes a random float32 Llama (TINY_LLAMA_CONFIG + overrides) with SmolLM2's tokenizer into
    `directory`, as transformers saves it; returns `directory`."""
    import transformers

    from pagedserve.model_files import default_model
    from pagedserve.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(default_model())
    config = transformers.LlamaConfig(
        **{
            **TINY_LLAMA_CONFIG,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@contextmanager
def resolve_model(model: str | None) -> Iterator[str]:
    """`None`/"smollm2" -> the default SmolLM2 GGUF; "tiny" -> a temporary random tiny Llama
    (removed afterwards); anything else is a path and passes through."""
    from pagedserve.model_files import default_model

    if model is None or model == SMOLLM2:
        yield default_model()
    elif model == TINY:
        with tempfile.TemporaryDirectory(prefix="pagedserve-tiny-") as directory:
            yield make_tiny_llama_checkpoint(directory)
    else:
        yield model


@dataclass(frozen=True, slots=True)
class ModelFlops:
    """Forward FLOPs of a decoder-only transformer, counted from its weights and shapes.

    One token of a step costs 2·`linear_params` (every matmul weight of the layers) plus
    attention 4·layers·heads·head_dim per key it attends to (QKᵀ and PV); each row that gets
    logits costs 2·vocab·hidden more. Norms, activations and rotary are ignored (< 1%).
    """

    linear_params: int
    num_layers: int
    q_width: int  # num_attention_heads * head_dim
    vocab_size: int
    hidden_size: int

    @classmethod
    def from_model(cls, model: nn.Module, hf_config: object) -> ModelFlops:
        linear_params = sum(
            p.numel()
            for name, p in model.named_parameters()
            if p.dim() >= 2 and "embed" not in name and "lm_head" not in name
        )
        num_heads = int(hf_config.num_attention_heads)  # type: ignore[attr-defined]
        hidden_size = int(hf_config.hidden_size)  # type: ignore[attr-defined]
        head_dim = int(getattr(hf_config, "head_dim", None) or hidden_size // num_heads)
        return cls(
            linear_params=linear_params,
            num_layers=int(hf_config.num_hidden_layers),  # type: ignore[attr-defined]
            q_width=num_heads * head_dim,
            vocab_size=int(hf_config.vocab_size),  # type: ignore[attr-defined]
            hidden_size=hidden_size,
        )

    def step_flops(self, query_lens: Sequence[int], num_computed_tokens: Sequence[int]) -> float:
        """FLOPs of one step: request i computes positions [c_i, c_i + q_i) and one logits row."""
        flops = 0.0
        attention_per_key = 4.0 * self.num_layers * self.q_width
        for q, c in zip(query_lens, num_computed_tokens):
            # token at position p attends to keys 0..p: sum over p of (p + 1) = q·c + q(q+1)/2
            flops += 2.0 * self.linear_params * q + attention_per_key * (q * c + q * (q + 1) / 2)
        return flops + 2.0 * self.vocab_size * self.hidden_size * len(query_lens)

    def tokens_flops(self, num_tokens: int, mean_context: float, num_logits_rows: int) -> float:
        """Approximate FLOPs of `num_tokens` tokens attending to `mean_context` keys on average."""
        per_token = 2.0 * self.linear_params + 4.0 * self.num_layers * self.q_width * mean_context
        return per_token * num_tokens + 2.0 * self.vocab_size * self.hidden_size * num_logits_rows


def measure_gemm_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of a [size, size] @ [size, size] `torch.mm` in `dtype` on the CPU."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100.0))
