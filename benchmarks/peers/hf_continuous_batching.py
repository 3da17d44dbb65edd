"""Peer: Hugging Face transformers' continuous batching on the same workload as pagedserve.

Optional (not a test dependency). Same random-token prompts as `pagedserve bench throughput` /
`pagedserve bench overhead` (same seed, lengths and vocabulary), greedy, EOS ignored, same model
weights (SmolLM2's GGUF dequantised by transformers, or any checkpoint directory), same dtype and
thread count. Prints output tokens/s and the fraction of the machine's GEMM FLOP/s reached.

transformers sizes its paged cache and batch automatically from GPU memory; on a CPU that sizing
is pathological, so every knob is given explicitly through `ContinuousBatchingConfig`.

Two drivers:
  default            the ContinuousBatchingManager that `generate_batch` runs, fed with one
                     `add_request` per prompt, so each request gets its own max_new_tokens and no
                     EOS (exactly our workload);
  --generate-batch   `model.generate_batch(...)` itself: one max_new_tokens for every request
                     (the longest of the workload); only the requested tokens are counted.

    python benchmarks/peers/hf_continuous_batching.py                       # SmolLM2, 64 in flight
    python benchmarks/peers/hf_continuous_batching.py --model tiny --num-prompts 16
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from pagedserve.benchmarks.throughput import Workload, make_workload, run_pagedserve
from pagedserve.benchmarks.utils import ModelFlops, measure_gemm_flops, resolve_model


def load_hf_model(model: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if model.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model), gguf_file=os.path.basename(model), dtype=dtype
        ).eval()
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()


def make_cb_config(args: argparse.Namespace) -> object:
    from transformers import ContinuousBatchingConfig

    # Enough pages for every concurrent request at full length: no preemption, no offloading.
    blocks_per_request = -(-args.max_model_len // args.page_size)
    return ContinuousBatchingConfig(
        page_size=args.page_size,
        num_blocks=args.max_num_seqs * blocks_per_request,
        max_batch_tokens=args.max_batch_tokens,
        max_requests_per_batch=args.max_num_seqs,
        max_blocks_per_request=0,  # the flash_attn_with_kvcache decode path does not exist on CPU
        allow_block_sharing=False,  # random prompts share nothing; pagedserve's hashing is on though
        use_async_batching=False,
        use_cuda_graph=False,
        scheduler_type="fifo",
        seed=args.seed,
    )


def run_manager(model: torch.nn.Module, workload: Workload, args: argparse.Namespace) -> float:
    from transformers import GenerationConfig

    generation_config = GenerationConfig(do_sample=False, max_new_tokens=max(workload.output_lens))
    with model.continuous_batching_context_manager(  # type: ignore[operator]
        generation_config=generation_config,
        continuous_batching_config=make_cb_config(args),
        block=True,
        timeout=5,
    ) as manager:
        start = time.perf_counter()
        for i, (prompt, max_new) in enumerate(zip(workload.prompts, workload.output_lens)):
            # eos_token_id=-1: no end-of-sequence token, like `ignore_eos`.
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=max_new, eos_token_id=-1)
        produced, finished = 0, 0
        while finished < len(workload.prompts):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped")
                continue
            if result.is_finished():
                finished += 1
                produced += len(result.generated_tokens)
        elapsed = time.perf_counter() - start
    if produced != workload.num_output_tokens:
        raise RuntimeError(f"transformers produced {produced} tokens, expected {workload.num_output_tokens}")
    return elapsed


def run_generate_batch(model: torch.nn.Module, workload: Workload, args: argparse.Namespace) -> float:
    from transformers import GenerationConfig

    max_new = max(workload.output_lens)
    generation_config = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new)
    start = time.perf_counter()
    outputs = model.generate_batch(  # type: ignore[operator]
        workload.prompts, generation_config=generation_config, continuous_batching_config=make_cb_config(args)
    )
    elapsed = time.perf_counter() - start
    if len(outputs) != len(workload.prompts):
        raise RuntimeError(f"generate_batch returned {len(outputs)} of {len(workload.prompts)} requests")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="'tiny', 'smollm2' (default) or a checkpoint path")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="requests per batch")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per step (ours: 2048)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=64, help="tokens per cache page")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--generate-batch", action="store_true", help="call generate_batch (uniform lengths)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pagedserve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run pagedserve's LLM.generate on the same workload first, for the ratio",
    )
    args = parser.parse_args()

    logging.getLogger("transformers").setLevel(logging.WARNING)
    dtype = getattr(torch, args.dtype)
    with resolve_model(args.model) as model_path:
        model = load_hf_model(model_path, dtype)
        config = model.config
        workload = make_workload(
            args.num_prompts, args.input_len, args.output_len, args.range_ratio, config.vocab_size, args.seed
        )
        print(
            f"transformers continuous batching: model={args.model or 'smollm2'} dtype={args.dtype} "
            f"prompts={args.num_prompts} input≈{args.input_len} output≈{args.output_len} "
            f"batch={args.max_num_seqs} threads={torch.get_num_threads()}"
        )
        ours = None
        if args.pagedserve:
            # run_pagedserve reads throughput's flags: the same engine settings, prefix caching on.
            ours_args = argparse.Namespace(**{**vars(args), "model": model_path})
            ours_args.enable_prefix_caching, ours_args.quiet = True, True
            ours = run_pagedserve(ours_args, workload)
        runner = run_generate_batch if args.generate_batch else run_manager
        elapsed = runner(model, workload, args)

    flops = ModelFlops.from_model(model, config)
    mean_context = args.input_len + args.output_len / 2
    total_flops = flops.tokens_flops(
        workload.num_prompt_tokens + workload.num_output_tokens, mean_context, workload.num_output_tokens
    )
    gemm = measure_gemm_flops(dtype)
    rows = [("generate_batch" if args.generate_batch else "transformers CB", elapsed)]
    if ours is not None:
        rows.insert(0, ("pagedserve", ours))
    for name, seconds in rows:
        print(
            f"{name:<16} {seconds:8.2f} s  {len(workload.prompts) / seconds:6.2f} req/s  "
            f"{workload.num_output_tokens / seconds:8.1f} output tok/s  "
            f"{(workload.num_prompt_tokens + workload.num_output_tokens) / seconds:8.1f} total tok/s  "
            f"{100 * total_flops / seconds / gemm:5.1f}% of GEMM ({gemm / 1e9:.0f} GFLOP/s)"
        )
    if ours is not None:
        print(f"output tok/s ratio pagedserve / transformers CB: {elapsed / ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
