"""Multi-LoRA throughput: the same requests on the base model and spread over adapters.

64 requests (by default) at concurrency 16 (max_num_seqs) through one engine with LoRA enabled:
once all on the base model, once spread round-robin over 8 rank-16 adapters on every
q/k/v/o/gate/up/down projection (random PEFT adapters made here with peft over the same
checkpoint). A third run without --enable-lora shows what enabling LoRA costs base requests.
Prints output tokens per second of each run and the adapters' throughput relative to the base.

    python benchmarks/lora.py                                   # SmolLM2-135M (HF f32 dir)
    python benchmarks/lora.py --model /work/models/smollm2-135m-instruct-bf16 --dtype bfloat16
    python benchmarks/lora.py --base-gguf                       # the Q4_1 GGUF as the base weights
    python benchmarks/lora.py --vllm-python /work/venvs/vllm/bin/python
                        # then vLLM's CPU build on the same prompts and adapters (peers/vllm_lora.py),
                        # after ours has freed its memory; prints ours / vLLM per workload

Greedy, ignore_eos: every request generates exactly --output-len tokens in every run.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.lora.request import LoRARequest

DEFAULT_MODEL = "/work/models/smollm2-135m-instruct-f32"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: str, num_adapters: int, rank: int, out_dir: str) -> list[str]:
    """Random PEFT adapters (init_lora_weights=False, B scaled down so outputs stay sane)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(num_adapters):
        path = os.path.join(out_dir, f"adapter{i}_r{rank}")
        paths.append(path)
        if os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            continue
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        model.save_pretrained(path)
    return paths


def run(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None] | None, output_len: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:4], params, use_tqdm=False, lora_request=None if loras is None else loras[:4])  # warm-up
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_tokens == len(prompts) * output_len
    return num_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint directory (adapters are made over it)")
    parser.add_argument("--base-gguf", action="store_true", help="serve SmolLM2's Q4_1 GGUF as the base weights")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16, help="max_num_seqs")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--adapter-dir", default=os.path.join(tempfile.gettempdir(), "pagedserve-bench-lora"))
    parser.add_argument("--skip-disabled", action="store_true", help="skip the run without --enable-lora")
    parser.add_argument("--vllm-python", help="vLLM's CPU build: its venv's python (runs peers/vllm_lora.py after ours)")
    args = parser.parse_args()

    os.makedirs(args.adapter_dir, exist_ok=True)
    paths = make_adapters(args.model, args.num_adapters, args.rank, args.adapter_dir)
    loras = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(paths)]
    model = args.model
    tokenizer = None
    if args.base_gguf:
        from pagedserve.model_files import default_model

        model, tokenizer = default_model(), args.model
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.input_len,), generator=gen).tolist() for _ in range(args.num_requests)]
    request_loras = [loras[i % len(loras)] for i in range(args.num_requests)]
    common = dict(tokenizer=tokenizer, dtype=args.dtype, max_model_len=1024, max_num_seqs=args.concurrency, seed=0)

    results: dict[str, float] = {}
    if not args.skip_disabled:
        llm = LLM(model, **common)
        results["base, LoRA disabled"] = run(llm, prompts, None, args.output_len)
        del llm
        gc.collect()
    llm = LLM(
        model, enable_lora=True, max_loras=len(loras), max_lora_rank=max(args.rank, 16), max_cpu_loras=len(loras),
        **common,
    )  # fmt: skip
    results["base, LoRA enabled"] = run(llm, prompts, None, args.output_len)
    results[f"{len(loras)} adapters"] = run(llm, prompts, request_loras, args.output_len)
    del llm
    gc.collect()

    base = results["base, LoRA enabled"]
    print(f"\n{args.num_requests} requests x {args.input_len} prompt + {args.output_len} output tokens, "
          f"concurrency {args.concurrency}, rank {args.rank}, model {model}")  # fmt: skip
    for name, tokens_per_s in results.items():
        print(f"  {name:<22} {tokens_per_s:8.1f} output tok/s   {tokens_per_s / base:5.2f}x base")
    cost = 1 - results[f"{len(loras)} adapters"] / base
    print(f"  throughput cost of the adapters: {cost:.1%}")
    if args.vllm_python:
        peer = run_vllm_peer(args)
        vllm_cost = 1 - peer["adapters"] / peer["base"]
        print(f"  vLLM base, LoRA enabled {peer['base']:8.1f} output tok/s   ours / vLLM {base / peer['base']:5.2f}x")
        print(f"  vLLM {len(loras)} adapters        {peer['adapters']:8.1f} output tok/s   ours / vLLM "
              f"{results[f'{len(loras)} adapters'] / peer['adapters']:5.2f}x   (vLLM's adapter cost {vllm_cost:.1%})")


def run_vllm_peer(args: argparse.Namespace) -> dict[str, float]:
    """peers/vllm_lora.py in vLLM's venv on the same workload; its two throughputs."""
    import json
    import subprocess
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "vllm.json")
        command = [args.vllm_python, str(Path(__file__).parent / "peers" / "vllm_lora.py"), "--model", args.model]
        for flag in ("num_requests", "num_adapters", "rank", "concurrency", "input_len", "output_len", "adapter_dir"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        subprocess.run([*command, "--json-out", str(out)], check=True)
        return json.loads(out.read_text())


if __name__ == "__main__":
    main()
