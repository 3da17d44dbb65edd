"""Decode latency of one small batch against the machine's memory-bandwidth limit (vLLM's
`bench latency`, plus the limit).

At batch 1 a decode step must read every weight the step uses once (all linear layers and the
LM head; one embedding row), so `weight bytes / memory bandwidth` is the fastest a step can be.
Both are measured here: the bytes from the checkpoint as the engine keeps it (GGUF blocks as
stored, float weights in the engine's dtype), the bandwidth as the best of a few multi-threaded
`torch.sum` passes over a buffer far larger than the caches, in the same process and run.

A decode step's time is taken from two runs of the same prompts: `output_len` tokens and one
token; the difference over `output_len - 1` steps leaves the prefill out.
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedserve.benchmarks.utils import resolve_model
from pagedserve.config.model import ModelConfig


def measure_read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best bytes/s of summing a float32 buffer of `num_bytes` on the torch threads."""
    buffer = torch.ones(num_bytes // 4)
    buffer.sum()  # warm-up: pages touched, threads started
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def decode_weight_bytes(model_config: ModelConfig) -> int:
    """Bytes of weight a decode step at batch 1 reads: every 2-D weight but the embedding table,
    plus the LM head (the embedding table itself when tied)."""
    if model_config.quantization == "gguf":
        from pagedserve.models.loader.gguf import open_gguf

        tensors = open_gguf(model_config.model).tensors
        total = sum(t.num_bytes for name, t in tensors.items() if len(t.shape) == 2 and name != "token_embd.weight")
        if "output.weight" not in tensors and "token_embd.weight" in tensors:
            total += tensors["token_embd.weight"].num_bytes
        return total
    from pagedserve.models.model_loader import build_meta_model

    model = build_meta_model(model_config)
    size = torch.empty((), dtype=model_config.torch_dtype).element_size()
    # named_parameters lists a tied LM head once (it is the embedding table)
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    embedding = getattr(getattr(model, "model", model), "embed_tokens", None)
    lm_head = getattr(model, "lm_head", None)
    if embedding is not None and (lm_head is None or lm_head.weight is not embedding.weight):
        total -= embedding.weight.numel()  # only looked-up rows are read
    return total * size


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="'smollm2' (default), 'tiny' or a checkpoint path")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=3, help="measured repetitions; the best counts")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from pagedserve import LLM, SamplingParams

    with resolve_model(args.model) as model:
        llm = LLM(
            model,
            dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=max(args.batch_size, 1),
            enable_prefix_caching=False,
            seed=args.seed,
        )
        model_config = ModelConfig(model=model, dtype=args.dtype, max_model_len=args.max_model_len)
        generator = torch.Generator().manual_seed(args.seed)
        vocab_size = llm.get_tokenizer().vocab_size
        prompts = [
            {"prompt_token_ids": torch.randint(100, vocab_size, (args.input_len,), generator=generator).tolist()}
            for _ in range(args.batch_size)
        ]

        def run(max_tokens: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        run(8)  # warm-up
        full = min(run(args.output_len) for _ in range(args.num_iters))
        prefill = min(run(1) for _ in range(args.num_iters))
        llm.llm_engine.shutdown()
    step = (full - prefill) / max(args.output_len - 1, 1)
    weight_bytes = decode_weight_bytes(model_config)
    bandwidth = measure_read_bandwidth()
    floor = weight_bytes / bandwidth
    print(f"model {model}, batch {args.batch_size}, {args.input_len} in / {args.output_len} out, {torch.get_num_threads()} threads")
    print(f"end-to-end {full * 1000:.1f} ms (prefill + first token {prefill * 1000:.1f} ms)")
    print(
        f"decode step {step * 1000:.2f} ms = {args.batch_size / step:.1f} tokens/s "
        f"({1 / step:.1f} steps/s)"
    )
    print(
        f"bandwidth limit: {weight_bytes / 2**20:.0f} MiB of weights per step / {bandwidth / 1e9:.1f} GB/s "
        f"= {floor * 1000:.2f} ms; the step takes {step / floor:.2f}x that"
    )
    return 0
