"""CPU cost of the engine core's scheduling step, with a simulated model.

Drives Scheduler + KVCacheManager in steady state: N running requests (decodes plus the prefill
chunks of requests that replace finished ones) and a waiting queue held at a fixed length.
Times `schedule()` and `update_from_output()` only; building the simulated model's output and
adding replacement requests are not timed.

    python benchmarks/scheduler.py                      # the default table (< 1 minute)
    python benchmarks/scheduler.py --running 1024 --waiting 0 1024 16384 --steps 100
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from dataclasses import dataclass

from pagedserve.config.cache import CacheConfig
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.core.request import Request
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.outputs import ModelRunnerOutput

VOCAB_SIZE = 32_000


@dataclass
class Workload:
    block_size: int
    min_prompt_len: int
    max_prompt_len: int
    min_output_len: int
    max_output_len: int
    shared_prefix_len: int
    num_shared_prefixes: int
    prefix_sharing: bool
    seed: int

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        # Prompts are slices of one token pool: a prompt list costs pointers, not int objects.
        self.token_pool = [self.rng.randrange(VOCAB_SIZE) for _ in range(1 << 16)]
        self.prefixes = [
            [self.rng.randrange(VOCAB_SIZE) for _ in range(self.shared_prefix_len)]
            for _ in range(self.num_shared_prefixes)
        ]
        self.sampling_params = {
            n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            for n in range(self.min_output_len, self.max_output_len + 1)
        }
        self.num_requests = 0

    def make_request(self) -> Request:
        rng = self.rng
        prompt_len = rng.randint(self.min_prompt_len, self.max_prompt_len)
        start = rng.randrange(len(self.token_pool) - prompt_len)
        if self.prefix_sharing:
            prefix = self.prefixes[rng.randrange(self.num_shared_prefixes)]
            prompt = prefix + self.token_pool[start : start + max(prompt_len - len(prefix), 16)]
        else:
            prompt = self.token_pool[start : start + prompt_len]
        self.num_requests += 1
        return Request(
            request_id=f"req-{self.num_requests}",
            prompt_token_ids=prompt,
            sampling_params=self.sampling_params[rng.randint(self.min_output_len, self.max_output_len)],
            eos_token_id=None,
        )


def simulated_model(scheduler: Scheduler, scheduler_output: SchedulerOutput, step: int) -> ModelRunnerOutput:
    """A token for every request whose prompt is fully computed; [] for a partial prefill."""
    requests = scheduler.requests
    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled: list[list[int]] = []
    for i, req_id in enumerate(req_ids):
        request = requests[req_id]
        # num_computed_tokens already counts this step's tokens (advanced by schedule()).
        sampled.append(
            [(step * 31 + i) % VOCAB_SIZE] if request.num_computed_tokens >= request.num_tokens else []
        )
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={req_id: i for i, req_id in enumerate(req_ids)},
        sampled_token_ids=sampled,
        logprobs=None,
        prompt_logprobs_dict={},
    )


@dataclass
class Result:
    num_running: int
    num_waiting: int
    prefix_sharing: bool
    # Thread CPU time per step; wall_us is schedule + update in wall-clock time.
    schedule_us: list[float]
    update_us: list[float]
    wall_us: list[float]
    num_scheduled_reqs: list[int]
    num_scheduled_tokens: list[int]
    num_new_reqs: list[int]
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    setup_s: float
    calls_per_req: float = 0.0

    @property
    def step_us(self) -> list[float]:
        return [a + b for a, b in zip(self.schedule_us, self.update_us)]

    @property
    def us_per_req(self) -> float:
        """Median over steps of the step's cost divided by the requests it scheduled."""
        return statistics.median(t / max(n, 1) for t, n in zip(self.step_us, self.num_scheduled_reqs))


def run_config(
    num_running: int,
    num_waiting: int,
    prefix_sharing: bool,
    args: argparse.Namespace,
) -> Result:
    setup_start = time.perf_counter()
    workload = Workload(
        block_size=args.block_size,
        min_prompt_len=args.min_prompt_len,
        max_prompt_len=args.max_prompt_len,
        min_output_len=args.min_output_len,
        max_output_len=args.max_output_len,
        shared_prefix_len=args.shared_prefix_len,
        num_shared_prefixes=args.num_shared_prefixes,
        prefix_sharing=prefix_sharing,
        seed=args.seed,
    )
    max_model_len = args.max_prompt_len + args.max_output_len
    blocks_per_request = -(-max_model_len // args.block_size)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=num_running,
            # Every running request decodes, plus room for prefill chunks of new requests.
            max_num_batched_tokens=num_running + args.prefill_budget,
            max_model_len=max_model_len,
        ),
        CacheConfig(
            block_size=args.block_size,
            enable_prefix_caching=prefix_sharing,
            prefix_caching_hash_seed=0,
            # Enough for every running request at full length: no preemption in steady state.
            num_gpu_blocks=num_running * blocks_per_request + 1 + args.extra_blocks,
        ),
        log_stats=True,
    )

    # Warm up to steady state: fill the running set with a large budget (not timed), then let
    # requests progress so that their remaining output lengths are spread out.
    for _ in range(num_running):
        scheduler.add_request(workload.make_request())
    budget = scheduler.max_num_scheduled_tokens
    scheduler.max_num_scheduled_tokens = 1 << 30
    step = 0
    for _ in range(args.warmup_steps):
        step += 1
        _drive_step(scheduler, workload, step, refill=True, timed=None)
        if step == 1:
            scheduler.max_num_scheduled_tokens = budget
    for _ in range(num_waiting):
        scheduler.add_request(workload.make_request())
    gc.collect()
    if args.gc_freeze:
        gc.freeze()
    setup_s = time.perf_counter() - setup_start

    result = Result(num_running, num_waiting, prefix_sharing, [], [], [], [], [], [], 0, 0, 0, setup_s)
    for _ in range(args.steps):
        step += 1
        _drive_step(scheduler, workload, step, refill=True, timed=result)
    # Function calls per scheduled request over a few more steps: a noise-free measure of the
    # work (timings on a shared machine move by 2x; call counts do not).
    result.calls_per_req = _count_calls_per_req(scheduler, workload, step, num_steps=5)
    if args.gc_freeze:
        gc.unfreeze()
    return result


def _count_calls_per_req(scheduler: Scheduler, workload: Workload, step: int, num_steps: int) -> float:
    num_calls = 0

    def count_calls(frame: object, event: str, arg: object) -> None:
        nonlocal num_calls
        if event == "call" or event == "c_call":
            num_calls += 1

    num_reqs = 0
    for _ in range(num_steps):
        step += 1
        sys.setprofile(count_calls)
        scheduler_output = scheduler.schedule()
        sys.setprofile(None)
        model_runner_output = simulated_model(scheduler, scheduler_output, step)
        sys.setprofile(count_calls)
        outputs = scheduler.update_from_output(scheduler_output, model_runner_output)
        sys.setprofile(None)
        num_reqs += len(scheduler_output.num_scheduled_tokens)
        for _ in outputs.finished_requests or ():
            scheduler.add_request(workload.make_request())
    return num_calls / max(num_reqs, 1)


def _drive_step(
    scheduler: Scheduler, workload: Workload, step: int, refill: bool, timed: Result | None
) -> None:
    # CPU time of this thread: other processes on a shared machine do not inflate it.
    w0, t0 = time.perf_counter(), time.thread_time()
    scheduler_output = scheduler.schedule()
    w1, t1 = time.perf_counter(), time.thread_time()
    model_runner_output = simulated_model(scheduler, scheduler_output, step)
    w2, t2 = time.perf_counter(), time.thread_time()
    outputs = scheduler.update_from_output(scheduler_output, model_runner_output)
    w3, t3 = time.perf_counter(), time.thread_time()
    if timed is not None:
        timed.schedule_us.append((t1 - t0) * 1e6)
        timed.update_us.append((t3 - t2) * 1e6)
        timed.wall_us.append((w1 - w0 + w3 - w2) * 1e6)
        timed.num_scheduled_reqs.append(len(scheduler_output.num_scheduled_tokens))
        timed.num_scheduled_tokens.append(scheduler_output.total_num_scheduled_tokens)
        timed.num_new_reqs.append(len(scheduler_output.scheduled_new_reqs))
        stats = outputs.scheduler_stats
        if stats is not None:
            timed.num_preemptions += stats.num_preemptions
            timed.prefix_cache_queries += stats.prefix_cache_queries
            timed.prefix_cache_hits += stats.prefix_cache_hits
    if refill and outputs.finished_requests:
        # Keep the number of live requests constant: one new request per finished one.
        for _ in outputs.finished_requests:
            scheduler.add_request(workload.make_request())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--running", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--waiting", type=int, nargs="+", default=[0, 16384])
    parser.add_argument("--prefix-sharing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--prefill-budget", type=int, default=2048, help="token budget beyond one per running request"
    )
    parser.add_argument("--min-prompt-len", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--min-output-len", type=int, default=16)
    parser.add_argument("--max-output-len", type=int, default=512)
    parser.add_argument("--shared-prefix-len", type=int, default=128, help="tokens; with --prefix-sharing on")
    parser.add_argument("--num-shared-prefixes", type=int, default=8)
    parser.add_argument("--extra-blocks", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-gc-freeze", dest="gc_freeze", action="store_false", help="leave setup objects to the cyclic GC"
    )
    parser.add_argument("--target-us-per-req", type=float, default=10.0)
    args = parser.parse_args()

    sharing = {"on": [True], "off": [False], "both": [True, False]}[args.prefix_sharing]
    header = (
        f"{'running':>7} {'waiting':>7} {'prefix':>6} {'hit %':>5} {'reqs/step':>9} {'new/step':>8} {'tok/step':>8} "
        f"{'sched µs':>9} {'update µs':>9} {'step µs':>9} {'p90 µs':>8} {'wall µs':>9} {'µs/req':>7} {'calls/req':>9} "
        f"{'vs w=0':>7} {'setup s':>7}"
    )
    print(header)
    print("-" * len(header))
    failures = []
    start = time.perf_counter()
    # Untimed: imports, allocator and interpreter caches warm up before the first timed row.
    run_config(64, 0, True, argparse.Namespace(**{**vars(args), "steps": 5, "warmup_steps": 5}))
    for num_running in args.running:
        for prefix_sharing in sharing:
            baseline_step_us = None
            for num_waiting in args.waiting:
                result = run_config(num_running, num_waiting, prefix_sharing, args)
                step_us = statistics.median(result.step_us)
                if baseline_step_us is None:
                    baseline_step_us = step_us
                p90 = statistics.quantiles(result.step_us, n=10)[-1] if len(result.step_us) > 1 else step_us
                hit_rate = 100 * result.prefix_cache_hits / max(result.prefix_cache_queries, 1)
                print(
                    f"{num_running:>7} {num_waiting:>7} {'on' if prefix_sharing else 'off':>6} {hit_rate:>5.1f} "
                    f"{statistics.mean(result.num_scheduled_reqs):>9.0f} "
                    f"{statistics.mean(result.num_new_reqs):>8.1f} "
                    f"{statistics.mean(result.num_scheduled_tokens):>8.0f} "
                    f"{statistics.median(result.schedule_us):>9.0f} {statistics.median(result.update_us):>9.0f} "
                    f"{step_us:>9.0f} {p90:>8.0f} {statistics.median(result.wall_us):>9.0f} "
                    f"{result.us_per_req:>7.2f} {result.calls_per_req:>9.1f} "
                    f"{step_us / baseline_step_us:>6.2f}x {result.setup_s:>7.1f}",
                    flush=True,
                )
                if result.num_preemptions:
                    print(f"        ({result.num_preemptions} preemptions)")
                if num_running == 1024 and result.us_per_req > args.target_us_per_req:
                    failures.append(
                        f"{num_running} running, {num_waiting} waiting: {result.us_per_req:.2f} µs/req"
                    )
    print(
        "\nMedians over timed steps of this thread's CPU time (wall µs: wall clock, inflated when other"
        "\nprocesses share the CPUs). µs/req = (schedule + update_from_output) per scheduled request;"
        "\ncalls/req = Python and C function calls per scheduled request (a few extra, profiled steps);"
        "\nvs w=0 = step time relative to the same configuration with an empty waiting queue."
        "\nprefix on: prefix caching, prompts start with one of a few shared system prompts (hit % ="
        "\nprefix-cache hit tokens / query tokens); off: prefix caching disabled, unique prompts."
        f"\nTotal {time.perf_counter() - start:.0f} s."
    )
    if failures:
        print(f"ABOVE the {args.target_us_per_req} µs/req target at 1024 running: " + "; ".join(failures))
    else:
        print(f"Target (<= {args.target_us_per_req} µs per scheduled request at 1024 running) met.")


if __name__ == "__main__":
    main()
