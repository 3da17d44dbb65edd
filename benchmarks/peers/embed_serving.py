"""Embeddings served by pagedserve and by vLLM's CPU build, one server after the other with the same
client: `pagedserve bench embed --base-url URL` (the generated sentences of `bench embed`, cut into
requests of 1-4 sentences, 64 clients each keeping one request in flight on /v1/embeddings).

    python benchmarks/peers/embed_serving.py [--model DIR] [--concurrency 64] \
        [--encoding-format float base64] [--vllm-python VENV/bin/python] [--rounds 2]
    # A/B of the engine's settings: pagedserve servers that differ only in their environment,
    # every variant and vLLM once per round, rounds alternating
    python benchmarks/peers/embed_serving.py --engines pagedserve --rounds 2 \
        --pagedserve-variants default= omp1=OMP_NUM_THREADS=1 passive=OMP_WAIT_POLICY=PASSIVE

Reported per engine and encoding format: sentences/s, request latency p50/p99, the client's own CPU
time (it shares the machine with the server), start-to-healthy; ratios against the first server of
the same round, and the cosine between the first server's vectors and every other's, sentence by
sentence. Both servers compute in float32 with up to --max-num-seqs requests per step. vLLM is optional (install: see
benchmarks/peers/vllm_pooling.py); `--engines pagedserve` runs ours alone.

Trap when reading the figures on a small machine: the client and the server's frontend share the
cores with the engine's OpenMP threads, and a parallel region waits for its slowest thread, so an
engine thread preempted by the frontend stalls the others; compare served with served. Even so, on a
2-core machine the engine core's default (one OpenMP thread per core, libgomp's spin-then-sleep
waits) served more than its alternatives in the A/B above (2 rounds, the same run): one thread
(OMP_NUM_THREADS=1) 0.69x and 0.89x, passive waits (OMP_WAIT_POLICY=PASSIVE) 0.95x and 0.98x. One
thread leaves a core to the frontend and client, which need far less than a core; sleeping waits
make every parallel region pay a wake-up. So `pagedserve serve` sets neither; both are the user's
to set in the environment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compare_serving import wait_healthy  # noqa: E402

from pagedserve.benchmarks.embed import DEFAULT_VLLM_PYTHON, VLLM_POOLING_SCRIPT, report_agreement  # noqa: E402
from pagedserve.benchmarks.server_process import start_pagedserve_server, stop_server  # noqa: E402
from pagedserve.envs import environment  # noqa: E402


@dataclass(frozen=True, slots=True)
class Variant:
    """One server to measure: an engine, and the environment variables it starts with on top of
    this process's (the pagedserve A/B variants differ only there)."""

    label: str
    engine: str
    env: dict[str, str]


def parse_variant(spec: str) -> Variant:
    """`LABEL=` or `LABEL=KEY=VALUE[,KEY=VALUE...]` -> a pagedserve variant."""
    label, sep, assignments = spec.partition("=")
    if not label or not sep:
        raise argparse.ArgumentTypeError(f"variant {spec!r}: expected LABEL= or LABEL=KEY=VALUE[,KEY=VALUE]")
    env = {}
    for item in filter(None, assignments.split(",")):
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise argparse.ArgumentTypeError(f"variant {spec!r}: {item!r} is not KEY=VALUE")
        env[key] = value
    return Variant(label, "pagedserve", env)


def start_server(variant: Variant, args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen[bytes], float]:
    """-> (the server, seconds from start to healthy)."""
    start = time.perf_counter()
    log_path = out / f"{variant.label}-server.log"
    with environment(**variant.env):  # the server process inherits them
        if variant.engine == "pagedserve":
            flags = ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), *args.pagedserve_args.split()]
            proc = start_pagedserve_server(args.model, args.port, flags, str(log_path), args.startup_timeout)
        elif variant.engine == "vllm":
            command = [args.vllm_python, str(VLLM_POOLING_SCRIPT), "serve", args.model, "--port", str(args.port)]
            command += ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "--", *args.vllm_args.split()]
            with open(log_path, "wb") as log:
                # start_new_session: stop_server's terminate reaches vLLM's whole process group.
                proc = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(), start_new_session=True
                )
            wait_healthy(f"http://127.0.0.1:{args.port}", proc, args.startup_timeout)
        else:
            raise SystemExit(f"unknown engine {variant.engine!r}")
    return proc, time.perf_counter() - start


def run_client(name: str, encoding_format: str, args: argparse.Namespace, out: Path) -> dict:
    """The client in its own process (its CPU time is its own); -> its figures."""
    name = f"{name}-{encoding_format}"
    client = [sys.executable, "-m", "pagedserve.entrypoints.cli", "bench", "embed"]
    client += ["--base-url", f"http://127.0.0.1:{args.port}", "--concurrency", str(args.concurrency)]
    client += ["--num-sentences", str(args.num_sentences), "--encoding-format", encoding_format]
    client += ["--sentences-per-request", *map(str, args.sentences_per_request), "--seed", str(args.seed)]
    client += ["--save-embeddings", str(out / f"{name}.npy"), "--save-result", str(out / f"{name}.json")]
    if args.model:
        client += ["--model", args.model]
    subprocess.run(client, check=True)
    return json.loads((out / f"{name}.json").read_text())


def print_table(results: list[dict[str, dict[str, dict]]], healthy_s: dict[str, float]) -> None:
    """One row per round, variant and format; ratios against the first variant of the same round."""
    print("\n| round | server | format | sentences/s | p50 (ms) | p99 (ms) | client CPU (s) | healthy (s) | "
          "sentences/s vs first | p99 vs first |")  # fmt: skip
    print("|---" * 10 + "|")
    for round_index, by_label in enumerate(results, 1):
        first = next(iter(by_label.values()))
        for label, by_format in by_label.items():
            for fmt, r in by_format.items():
                base = first.get(fmt)
                ratio = f"{r['sentences_per_s'] / base['sentences_per_s']:.2f}x" if base else "-"
                p99_ratio = f"{r['p99_latency_ms'] / base['p99_latency_ms']:.2f}x" if base else "-"
                print(f"| {round_index} | {label} | {fmt} | {r['sentences_per_s']:.1f} | {r['p50_latency_ms']:.0f} | "
                      f"{r['p99_latency_ms']:.0f} | {r['client_cpu_s']:.1f} | {healthy_s[label]:.0f} | "
                      f"{ratio} | {p99_ratio} |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="embedding model directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--engines", default="pagedserve,vllm")
    parser.add_argument(
        "--pagedserve-variants",
        nargs="+",
        type=parse_variant,
        default=None,
        metavar="LABEL=[KEY=VALUE,...]",
        help="pagedserve servers differing only in environment variables (default: one, `pagedserve=`)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="every server once per round, in the same order")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-sentences", type=int, default=2000)
    parser.add_argument("--sentences-per-request", type=int, nargs=2, default=[1, 4], metavar=("MIN", "MAX"))
    parser.add_argument("--encoding-format", nargs="+", choices=["float", "base64"], default=["float"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="both servers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--pagedserve-args", default="", help="more `pagedserve serve` flags")
    parser.add_argument("--vllm-python", default=str(DEFAULT_VLLM_PYTHON))
    parser.add_argument("--vllm-args", default="", help="more vLLM server flags")
    parser.add_argument("--out", default="embed-serving-results")
    args = parser.parse_args()
    if args.model is None:
        from pagedserve.model_files import all_minilm_l6_v2

        args.model = all_minilm_l6_v2()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants: list[Variant] = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if engine == "pagedserve":
            variants += args.pagedserve_variants or [Variant("pagedserve", "pagedserve", {})]
        else:
            variants.append(Variant(engine, engine, {}))
    if len({v.label for v in variants}) != len(variants):
        raise SystemExit("every server needs its own label")
    results: list[dict[str, dict[str, dict]]] = []
    healthy_s: dict[str, float] = {}
    for round_index in range(1, args.rounds + 1):
        results.append({})
        for variant in variants:
            env = " ".join(f"{k}={v}" for k, v in variant.env.items())
            print(f"== round {round_index}: {variant.label} {env}, {args.concurrency} clients", flush=True)
            proc, healthy_s[variant.label] = start_server(variant, args, out)
            try:
                results[-1][variant.label] = {fmt: run_client(variant.label, fmt, args, out) for fmt in args.encoding_format}
            finally:
                stop_server(proc)
    print_table(results, healthy_s)
    status = 0
    # The vectors of the last round: every server's against the first server's.
    for fmt in args.encoding_format:
        ours = torch.from_numpy(np.load(out / f"{variants[0].label}-{fmt}.npy"))
        for variant in variants[1:]:
            theirs = torch.from_numpy(np.load(out / f"{variant.label}-{fmt}.npy"))
            status |= report_agreement(ours, theirs, f"{variant.label} ({fmt})")
    return status


if __name__ == "__main__":
    sys.exit(main())
