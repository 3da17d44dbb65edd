"""Structured outputs on pagedserve and on vLLM's CPU build, one server after the other with the
same client: `pagedserve bench serve --structured-output-ratio 0 1` (random token-id prompts, greedy,
ignore_eos, every request of the second pass constrained to the same JSON schema) at one concurrency,
then the TTFT of a new schema (compiled) against the same schema again (cached).

    python benchmarks/peers/structured_output_serving.py --gguf MODEL.gguf --vllm-model HF_DIR

Reported per engine: TPOT with 100% JSON-schema requests against 0% (ratio > 1: slower), and the
compile vs cached TTFT. vLLM cannot load GGUF and serves a safetensors directory of the same weights
(benchmarks/peers/vllm_cpu.sh convert), so the two engines' absolute figures compare dense float32
against quantized compute; the ratios within each engine are the point. vLLM is optional
(vllm_cpu.sh install); `--engines pagedserve` runs ours alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compare_serving import client_command, server_command, wait_healthy  # noqa: E402


def run_engine(engine: str, args: argparse.Namespace, out: Path) -> dict:
    cmd, env = server_command(engine, args, args.concurrency, args.port)
    log = open(out / f"{engine}-structured.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{args.port}"
        healthy_s = wait_healthy(url, proc, args.startup_timeout)
        result_file = out / f"{engine}-structured.json"
        client = client_command(url, engine, args, args.num_prompts, args.concurrency, 0.0, result_file)
        client += ["--structured-output-ratio", "0", "1", "--structured-output-ttft-samples", str(args.ttft_samples)]
        subprocess.run(client, check=True)
        unconstrained, constrained = json.loads(result_file.read_text())
        return {"unconstrained": unconstrained, "constrained": constrained, "healthy_s": healthy_s}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def print_table(results: dict[str, dict]) -> None:
    print("\n| engine | TPOT median 0% (ms) | TPOT median 100% (ms) | 100% / 0% | TPOT mean 100% / 0% | "
          "TTFT new schema (ms) | TTFT cached schema (ms) | new / cached |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for engine, result in results.items():
        free, json_only = result["unconstrained"], result["constrained"]
        new = 1e3 * statistics.median(json_only["schema_ttft_new_s"])
        cached = 1e3 * statistics.median(json_only["schema_ttft_cached_s"])
        print(
            f"| {engine} | {free['median_tpot_ms']:.1f} | {json_only['median_tpot_ms']:.1f} | "
            f"{json_only['median_tpot_ms'] / free['median_tpot_ms']:.3f}x | "
            f"{json_only['mean_tpot_ms'] / free['mean_tpot_ms']:.3f}x | {new:.0f} | {cached:.0f} | {new / cached:.2f}x |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gguf", required=True, help="the GGUF file pagedserve serves (and the client's vocabulary)"
    )
    parser.add_argument("--vllm-model", help="safetensors directory of the same weights for vLLM")
    parser.add_argument("--engines", default="pagedserve,vllm")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--ttft-samples", type=int, default=5)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8096)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--pagedserve-args", default="")
    parser.add_argument(
        "--vllm-python", default=str(Path.home() / ".cache/pagedserve-peers/vllm-cpu/venv/bin/python")
    )
    parser.add_argument("--vllm-dtype", default="float32")
    parser.add_argument("--vllm-kv-space-gib", type=float, default=1)
    parser.add_argument("--vllm-args", default="")
    parser.add_argument("--out", default="structured-output-results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        print(f"== {engine}, concurrency {args.concurrency}, {args.num_prompts} prompts", flush=True)
        start = time.perf_counter()
        results[engine] = run_engine(engine, args, out)
        print(f"== {engine} done in {time.perf_counter() - start:.0f} s", flush=True)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
