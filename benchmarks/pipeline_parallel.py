"""Pipeline parallel throughput: PP=2 with and without the batch queue against PP=1, one run.

    python benchmarks/pipeline_parallel.py --model tiny      # random 2-layer hidden-256 Llama
    python benchmarks/pipeline_parallel.py                   # SmolLM2-135M

Runs the same workload (the engine core in this process) through
  (1) PP=1: one worker;
  (2) PP=2 (multiproc executor) with the batch queue: two steps in flight, one per stage;
  (3) PP=2 without it: each step runs through both stages before the next is scheduled.
Every configuration runs its decoder layers eagerly (PAGEDSERVE_FUSED_DECODE=0): a pipeline
stage cannot use the fused decode step, which runs every layer of the model.

Then it times the two halves of the PP=1 forward (embedding + the first stage's layers; the
other layers + norm + logits + sampling) and prints what two hosts, one stage each, would gain:
with the batch queue each step carries about half the running requests (a request waits for its
token), so a stage does two micro-batches per round of the batch. If a stage's time scales with
its batch, a round costs max(stage times) instead of their sum; if it does not (small batches
read the same weights either way), it costs twice the slower stage, and PP gains nothing but
memory. Activations cross the network once per step: 2 x tokens x hidden x dtype bytes.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from pagedserve.benchmarks.throughput import Workload, make_workload
from pagedserve.benchmarks.utils import resolve_model
from pagedserve.envs import environment


def _run(
    model: str, workload: Workload, args: argparse.Namespace, batch_queue_size: int | None, **engine_args: Any
) -> tuple[float, int, Any]:
    """-> (seconds, engine steps that computed tokens, the LLM) for one configuration;
    `batch_queue_size` overrides the engine core's (None: the executor's)."""
    from pagedserve import LLM, SamplingParams

    with environment(PAGEDSERVE_ENABLE_MULTIPROCESSING="0"):
        llm = LLM(
            model,
            dtype="float32",
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            **engine_args,
        )
    core = llm.llm_engine.engine_core.engine_core
    if batch_queue_size is not None:
        core.batch_queue_size = batch_queue_size
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in workload.output_lens]
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    warm_up = min(len(prompts), args.max_num_seqs)
    llm.generate(prompts[:warm_up], [SamplingParams(max_tokens=2)] * warm_up, use_tqdm=False)
    llm.reset_prefix_cache()
    schedule, num_steps = core.scheduler.schedule, 0

    def counting_schedule() -> Any:
        nonlocal num_steps
        output = schedule()
        num_steps += output.total_num_scheduled_tokens > 0
        return output

    core.scheduler.schedule = counting_schedule
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    del core.scheduler.schedule
    return seconds, num_steps, llm


def _stage_times(
    llm: Any, model: str, workload: Workload, args: argparse.Namespace
) -> tuple[float, float, int]:
    """Seconds in each half of the PP=1 forward over the workload (hooks around the layers), and
    the hidden size."""
    from pagedserve import SamplingParams
    from pagedserve.models.utils import get_pp_indices

    runner = llm.llm_engine.engine_core.engine_core.executor.worker.model_runner
    decoder = runner.model.model
    _, split = get_pp_indices(len(decoder.layers), 0, 2)
    marks: dict[str, float] = {}
    totals = {"first": 0.0, "second": 0.0}

    def mark(name: str) -> Any:
        def hook(*_: Any) -> None:
            marks[name] = time.perf_counter()

        return hook

    handles = [
        decoder.register_forward_pre_hook(mark("start")),
        decoder.layers[split].register_forward_pre_hook(mark("split")),
    ]
    sample = runner.sampler.forward

    def timed_sample(*a: Any, **k: Any) -> Any:
        out = sample(*a, **k)
        totals["first"] += marks["split"] - marks["start"]
        totals["second"] += time.perf_counter() - marks["split"]
        return out

    runner.sampler.forward = timed_sample
    llm.reset_prefix_cache()
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in workload.output_lens]
    llm.generate([{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=False)
    for handle in handles:
        handle.remove()
    del runner.sampler.forward
    return totals["first"], totals["second"], runner.model.config.hidden_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="'tiny', 'smollm2' (default) or a checkpoint path")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--network-gbit-s", type=float, default=10.0, help="for the two-host estimate")
    args = parser.parse_args()
    os.environ["PAGEDSERVE_FUSED_DECODE"] = "0"
    os.environ.setdefault("PAGEDSERVE_LOGGING_LEVEL", "WARNING")
    with resolve_model(args.model) as model:
        from pagedserve.config.model import ModelConfig

        vocab_size = ModelConfig(model, dtype="float32", max_model_len=args.max_model_len).vocab_size
        workload = make_workload(args.num_prompts, args.input_len, args.output_len, 0.5, vocab_size, 0)
        tokens = workload.num_output_tokens
        rows = []
        for label, engine_args, queue in (
            ("PP=1", {}, None),
            ("PP=2, batch queue (2 steps in flight)", {"pipeline_parallel_size": 2}, None),
            ("PP=2, no batch queue (1 step)", {"pipeline_parallel_size": 2}, 1),
        ):
            seconds, num_steps, llm = _run(model, workload, args, queue, **engine_args)
            rows.append((label, seconds, num_steps))
            if engine_args:
                llm.llm_engine.shutdown()
            else:
                first, second, hidden = _stage_times(llm, model, workload, args)
                llm.llm_engine.shutdown()
        base = rows[0][1]
        print(
            f"model={args.model or 'smollm2'} requests={args.num_prompts} output tokens={tokens} (eager layers)"
        )
        print(f"{'':<40}{'seconds':>9}{'steps':>7}{'ms/step':>9}{'output tok/s':>14}{'vs PP=1':>9}")
        for label, seconds, num_steps in rows:
            print(
                f"{label:<40}{seconds:9.2f}{num_steps:7d}{1e3 * seconds / num_steps:9.2f}"
                f"{tokens / seconds:14.1f}{base / seconds:8.2f}x"
            )
        pp1_steps = rows[0][2]
        s0, s1 = 1e3 * first / pp1_steps, 1e3 * second / pp1_steps
        # Decode steps move ~max_num_seqs tokens; a micro-batch half of them, hidden + residual.
        transfer_ms = 1e3 * 2 * (args.max_num_seqs / 2) * hidden * 4 * 8 / (args.network_gbit_s * 1e9)
        print(
            f"PP=1 forward halves per step: stage 0 (embedding + first layers) {s0:.2f} ms, "
            f"stage 1 (other layers + norm + logits + sampling) {s1:.2f} ms"
        )
        print(
            f"two hosts, one stage each, batch queue on: a round of the batch costs max({s0:.2f}, {s1:.2f}) "
            f"+ {transfer_ms:.3f} ms transfer if stage time scales with the batch -> up to "
            f"{(s0 + s1) / (max(s0, s1) + transfer_ms):.2f}x the forward rate; 2 x max = {2 * max(s0, s1):.2f} ms "
            f"(no gain, {(s0 + s1) / (2 * max(s0, s1)):.2f}x) if it does not"
        )


if __name__ == "__main__":
    main()
