"""Offline throughput: pagedserve vs transformers `generate` on the same random-length workload.

Prompts are random token ids with lengths drawn uniformly in mean*(1 ± range_ratio), fixed seed,
`ignore_eos`, so both engines produce exactly the requested number of tokens. transformers runs
the same prompts in padded static batches of `--hf-batch-size`, generating each batch's longest
output; only requested tokens are counted for either engine. With several batch sizes each runs,
and the ratio is taken against the fastest.

Next to each figure: the compute limit. The workload's useful FLOPs (every prompt and output
token through the model once, attention over its own context, one logits row per output token;
`ModelFlops`, no padding) divided by the elapsed time, as a fraction of the FLOP/s a large
`torch.mm` reaches in the same dtype, measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.benchmarks.utils import ModelFlops, measure_gemm_flops
from pagedserve.config.model import ModelConfig


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int
) -> Workload:
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> list[int]:
        low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(low, high + 1, size=num_prompts).tolist()

    in_lens, out_lens = lengths(input_len), lengths(output_len)
    # Skip the lowest ids: tokenizers keep their special tokens there.
    prompts = [rng.integers(100, vocab_size, size=n).tolist() for n in in_lens]
    return Workload(prompts, out_lens)


def run_pagedserve(args: argparse.Namespace, workload: Workload) -> float:
    from pagedserve import LLM, SamplingParams

    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
    )
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in workload.output_lens]
    llm.generate(
        [{"prompt_token_ids": p} for p in workload.prompts[:2]], params[:2], use_tqdm=False
    )  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=not args.quiet
    )
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != workload.num_output_tokens:
        raise RuntimeError(f"pagedserve produced {produced} tokens, expected {workload.num_output_tokens}")
    del llm
    return elapsed


def _load_hf_model(model: str, dtype: torch.dtype) -> torch.nn.Module:
    import os

    from transformers import AutoModelForCausalLM

    if model.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model), gguf_file=os.path.basename(model), dtype=dtype
        ).eval()
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()


def run_hf(model: torch.nn.Module, workload: Workload, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(workload.prompts), batch_size):
            prompts = workload.prompts[b : b + batch_size]
            max_len = max(len(p) for p in prompts)
            # Left padding, so every row's next token follows its own last prompt token.
            input_ids = torch.zeros(len(prompts), max_len, dtype=torch.long)
            attention_mask = torch.zeros(len(prompts), max_len, dtype=torch.long)
            for i, p in enumerate(prompts):
                input_ids[i, max_len - len(p) :] = torch.tensor(p)
                attention_mask[i, max_len - len(p) :] = 1
            max_new = max(workload.output_lens[b : b + batch_size])
            model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                pad_token_id=0,
            )
    return time.perf_counter() - start


def workload_flops(flops: ModelFlops, workload: Workload) -> float:
    """Useful FLOPs of the workload: each request's P + O - 1 tokens (the last output token is
    never fed back) from position 0, and O logits rows."""
    logits_row = 2.0 * flops.vocab_size * flops.hidden_size
    return sum(
        flops.step_flops([len(p) + o - 1], [0]) + logits_row * (o - 1)
        for p, o in zip(workload.prompts, workload.output_lens)
    )


def model_flops(model_config: ModelConfig) -> ModelFlops:
    """`ModelFlops` of the model pagedserve would build, counted on the meta device (no weights)."""
    from pagedserve.models.model_loader import build_meta_model

    return ModelFlops.from_model(build_meta_model(model_config), model_config.hf_config)


def _report(name: str, elapsed: float, workload: Workload, useful_flops: float, gemm_flops: float) -> float:
    num_reqs = len(workload.prompts)
    out_tps = workload.num_output_tokens / elapsed
    total_tps = (workload.num_prompt_tokens + workload.num_output_tokens) / elapsed
    print(
        f"{name:<12} {elapsed:8.2f} s  {num_reqs / elapsed:7.2f} req/s  "
        f"{out_tps:9.1f} output tok/s  {total_tps:9.1f} total tok/s  "
        f"{useful_flops / elapsed / 1e9:6.1f} useful GFLOP/s = {100 * useful_flops / elapsed / gemm_flops:.1f}% of torch.mm"
    )
    return out_tps


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--backend", choices=["pagedserve", "hf", "both"], default="both")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.5, help="lengths vary in mean*(1±ratio)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--hf-batch-size",
        type=int,
        nargs="+",
        default=None,
        help="transformers' static batch size(s); with several, each runs and the ratio is taken "
        "against the best (default: --max-num-seqs)",
    )
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both engines)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from pagedserve.model_files import default_model

    logging.getLogger("pagedserve").setLevel(logging.WARNING)
    args.model = args.model or default_model()
    model_config = ModelConfig(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    workload = make_workload(
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.range_ratio,
        model_config.vocab_size,
        args.seed,
    )
    useful_flops = workload_flops(model_flops(model_config), workload)
    gemm_flops = measure_gemm_flops(model_config.torch_dtype)
    print(
        f"model={args.model} dtype={model_config.torch_dtype} prompts={args.num_prompts} "
        f"input≈{args.input_len} output≈{args.output_len} threads={torch.get_num_threads()}\n"
        f"useful work {useful_flops / 1e12:.2f} TFLOP; a 2048² torch.mm reaches {gemm_flops / 1e9:.0f} GFLOP/s"
    )
    results = {}
    if args.backend in ("pagedserve", "both"):
        elapsed = run_pagedserve(args, workload)
        results["pagedserve"] = _report("pagedserve", elapsed, workload, useful_flops, gemm_flops)
    if args.backend in ("hf", "both"):
        hf_model = _load_hf_model(args.model, model_config.torch_dtype)
        for batch_size in args.hf_batch_size or [args.max_num_seqs]:
            elapsed = run_hf(hf_model, workload, batch_size)
            results[batch_size] = _report(f"hf bs={batch_size}", elapsed, workload, useful_flops, gemm_flops)
    if "pagedserve" in results and len(results) > 1:
        best = max((k for k in results if k != "pagedserve"), key=lambda k: results[k])
        print(
            f"output tok/s ratio pagedserve (max-num-seqs {args.max_num_seqs}) / transformers "
            f"(best static batch, {best}): {results['pagedserve'] / results[best]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(add_cli_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
