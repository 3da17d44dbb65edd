"""Greedy text of pagedserve against llama.cpp's llama-server on the same quantized GGUF.

    python benchmarks/peers/greedy_vs_llama_cpp.py --gguf MODEL.gguf [--max-tokens 32]

Both engines get the same prompt token ids (pagedserve's tokenizer, BOS as the model wants it)
and decode greedily; the script prints, per prompt, whether the generated token ids are equal
and, where they differ, the first differing step. With --reference it also runs transformers in
float32 on the same file dequantized (the exact arithmetic both engines approximate) and says
which engine, if either, follows it. The two engines quantize activations
differently (llama.cpp to int8 blocks, pagedserve to int16 blocks), so a near-tie between the
two best tokens may flip, after which the texts diverge. llama-server comes from
benchmarks/peers/llama_cpp.sh build; nothing here is a test dependency.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import httpx

LLAMA_SERVER = Path.home() / ".cache/pagedserve-peers/llama.cpp/build/bin/llama-server"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\n\ndef normalize(v):",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "SELECT name FROM users WHERE",
    "The theory of relativity was developed by",
]


def llama_cpp_greedy(args: argparse.Namespace, prompts: list[list[int]]) -> list[list[int]]:
    cmd = [args.llama_server, "-m", args.gguf, "-t", str(args.threads), "-np", "1", "-c", "2048"]
    cmd += ["--port", str(args.port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("llama-server did not become healthy")
            time.sleep(0.2)
        outputs = []
        for ids in prompts:
            body = {
                "prompt": ids,
                "n_predict": args.max_tokens,
                "temperature": 0.0,
                "top_k": 1,
                "cache_prompt": False,
                "ignore_eos": True,
                "return_tokens": True,
            }
            reply = httpx.post(f"{url}/completion", json=body, timeout=300).json()
            outputs.append(list(reply["tokens"]))
        return outputs
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8096)
    parser.add_argument("--llama-server", default=str(LLAMA_SERVER))
    parser.add_argument("--reference", action="store_true", help="also transformers in float32 (slow load)")
    args = parser.parse_args()

    from pagedserve import LLM, SamplingParams

    llm = LLM(args.gguf, max_model_len=2048, max_num_seqs=len(PROMPTS), seed=0)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    llm.llm_engine.shutdown()
    theirs = llama_cpp_greedy(args, prompts)
    reference = transformers_greedy(args, prompts) if args.reference else None

    equal = 0
    agree = {"pagedserve": 0, "llama.cpp": 0}
    for index, (text, a, b) in enumerate(zip(PROMPTS, ours, theirs)):
        a, b = list(a), list(b)
        same = a == b
        equal += same
        where = "" if same else f" (first difference at step {first_difference(a, b)})"
        print(f"{'equal  ' if same else 'differs'} {text!r}{where}")
        if not same:
            print(f"    pagedserve: {tokenizer.decode(a)!r}\n    llama.cpp:  {tokenizer.decode(b)!r}")
        if reference is not None:
            ref = reference[index]
            steps = {"pagedserve": first_difference(a, ref), "llama.cpp": first_difference(b, ref)}
            for engine, step in steps.items():
                agree[engine] += step == len(ref)
            print("    steps equal to float32 transformers: " + ", ".join(f"{e} {s}" for e, s in steps.items()))
    print(f"{equal} of {len(PROMPTS)} prompts: greedy tokens equal over {args.max_tokens} steps")
    if reference is not None:
        print(
            f"equal to float32 transformers over all {args.max_tokens} steps: pagedserve "
            f"{agree['pagedserve']} of {len(PROMPTS)}, llama.cpp {agree['llama.cpp']} of {len(PROMPTS)}"
        )
    return 0


def first_difference(a: list[int], b: list[int]) -> int:
    """The first step where a and b differ (their common length when one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def transformers_greedy(args: argparse.Namespace, prompts: list[list[int]]) -> list[list[int]]:
    import os

    import torch
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


if __name__ == "__main__":
    sys.exit(main())
