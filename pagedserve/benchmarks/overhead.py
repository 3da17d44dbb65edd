"""CPU overhead of the engine against the ideal loop: the same workload, step for step.

    (a) engine      `LLM.generate` as users run it: frontend + engine-core process.
    (b) ideal loop  only `model(...)`, `compute_logits`, `sampler(...)`, on inputs built up
                    front with exactly the batch shapes the engine ran (same steps, same
                    per-request query lengths and computed tokens, same block tables).

How (b)'s inputs are obtained: the workload is run once more with the engine in-process
(`PAGEDSERVE_ENABLE_MULTIPROCESSING=0`), with timers wrapped around the engine's methods from the
outside. That run records each step's SchedulerOutput shapes and the attention inputs the model
runner derived from them (query lengths, computed tokens, block table, slot mapping), the input
ids and positions, and the sampling metadata; the ideal loop rebuilds the backend's attention
metadata from those up front and then times nothing but the three calls. The same run gives
the breakdown of the engine's CPU time per step. Timers are exclusive: a nested timed call
(e.g. the forward inside `execute_model`) counts only in its own row.

Overhead = 1 − b/a. FLOPs are counted from the recorded shapes (`ModelFlops`) and reported as a
fraction of the GEMM FLOP/s a large `torch.mm` reaches in the same dtype in the same run.

    pagedserve bench overhead --model tiny       # random 2-layer, hidden-256 Llama
    pagedserve bench overhead                    # SmolLM2-135M (the default model)

`--executor-backends mp ray` compares executors instead, at `--tensor-parallel-size` (default 2):
the same workload through each (engine core in this process, so the executor can be timed), as
milliseconds per engine step, and the round trip of an empty step (send the SchedulerOutput to
every worker, get the output rank's answer: the executor's own cost per step).

    pagedserve bench overhead --model tiny --executor-backends mp ray
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pagedserve.attention.forward_context import set_forward_context
from pagedserve.benchmarks.throughput import Workload, make_workload
from pagedserve.benchmarks.utils import (
    ModelFlops,
    measure_gemm_flops,
    resolve_model,
)
from pagedserve.envs import environment

# Breakdown rows, in the order of a step. Each maps to the methods whose exclusive time it sums.
ROWS: list[tuple[str, str]] = [
    ("schedule", "Scheduler.schedule"),
    ("prepare_inputs", "ModelRunner._update_states/_prepare_inputs/_build_attn_metadata"),
    ("forward", "model.forward + model.compute_logits"),
    ("sampling", "Sampler.forward"),
    ("runner_other", "rest of ModelRunner.execute_model (sampled tokens -> batch, output)"),
    ("update_from_output", "Scheduler.update_from_output"),
    ("wait_for_model", "EngineCore waiting on the executor's future (async scheduling)"),
    ("core_other", "rest of EngineCore.step (executor call, batch queue)"),
    ("output_processing", "OutputProcessor.process_outputs (detokenize, RequestOutput)"),
    ("frontend_other", "rest of LLMEngine.step (client, stats, aborts)"),
    ("unattributed", "add_request/processor, generate loop, everything else"),
]
# Time spent recording replay inputs (main thread / executor thread): excluded from every figure.
_CAPTURE, _CAPTURE_WORKER = "_capture", "_capture_worker"


class ExclusiveTimers:
    """Wall time per category, exclusive of nested timed calls: a call's time counts once, in
    the innermost timed category of its thread (one stack per thread). `threads[category]` names
    the threads a category ran on: with async scheduling the model runner runs on the executor's
    thread, overlapped with the scheduler and the frontend on the main thread."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.threads: dict[str, set[str]] = defaultdict(set)
        self.main_thread_seconds = 0.0
        self._local = threading.local()

    def _stack(self) -> list[list[float]]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def wrap(
        self, fn: Callable[..., Any], category: str, after: Callable[..., None] | None = None
    ) -> Callable[..., Any]:
        """`fn` timed under `category`; `after(result, *args, **kwargs)` runs after it, untimed."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._stack()
            frame = [0.0]  # seconds spent in nested timed calls
            stack.append(frame)
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                stack.pop()
                self.seconds[category] += elapsed - frame[0]
                self.calls[category] += 1
                on_main = threading.current_thread() is threading.main_thread()
                self.threads[category].add("main" if on_main else "worker")
                if on_main:
                    self.main_thread_seconds += elapsed - frame[0]
                if stack:
                    stack[-1][0] += elapsed
            if after is not None:
                start = time.perf_counter()
                after(result, *args, **kwargs)
                elapsed = time.perf_counter() - start
                if threading.current_thread() is threading.main_thread():
                    self.seconds[_CAPTURE] += elapsed
                    self.main_thread_seconds += elapsed
                else:
                    self.seconds[_CAPTURE_WORKER] += elapsed
                if stack:
                    stack[-1][0] += elapsed
            return result

        return timed


class Patches:
    """Instance-level monkeypatches, undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.missing: list[str] = []

    def wrap(
        self,
        obj: Any,
        name: str,
        timers: ExclusiveTimers,
        category: str,
        after: Callable[..., None] | None = None,
    ) -> None:
        original = getattr(obj, name, None)
        if original is None:
            self.missing.append(f"{type(obj).__name__}.{name}")
            return
        self.replace(obj, name, timers.wrap(original, category, after))

    def replace(self, obj: Any, name: str, value: Any) -> None:
        original = getattr(obj, name)
        had_own = name in vars(obj)
        setattr(obj, name, value)

        def undo() -> None:
            if had_own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)

        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass
class ReplayStep:
    """Everything the ideal loop needs for one forward, recorded from the engine's step."""

    # Snapshots of the CommonAttentionMetadata of every KV-cache group; `common` is group 0's.
    commons: list[Any] = field(default_factory=list)
    model_args: tuple[Any, ...] = ()
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling_metadata: Any = None

    @property
    def common(self) -> Any:
        return self.commons[0]

    @property
    def query_lens(self) -> list[int]:
        return self.common.query_lens.tolist()

    @property
    def num_computed_tokens(self) -> list[int]:
        return self.common.num_computed_tokens.tolist()


@dataclass
class Recorder:
    # Per scheduled step: (num_scheduled_tokens, num_computed_tokens) of each request.
    scheduler_steps: list[list[tuple[int, int]]] = field(default_factory=list)
    replay_steps: list[ReplayStep] = field(default_factory=list)

    def on_schedule(self, so: Any) -> None:
        computed = {new.req_id: new.num_computed_tokens for new in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        if so.total_num_scheduled_tokens:
            self.scheduler_steps.append(
                [(n, computed.get(r, -1)) for r, n in so.num_scheduled_tokens.items()]
            )

    # NOTE: snapshots, not references: the persistent batch reuses its buffers next step.
    def on_build_metadata(self, _result: Any, commons: list[Any]) -> None:
        self.replay_steps.append(ReplayStep(commons=snapshot(commons)))

    def on_forward(self, _result: Any, *args: Any, **kwargs: Any) -> None:
        step = self.replay_steps[-1]
        step.model_args = snapshot(args)
        step.model_kwargs = snapshot(kwargs)

    def on_sample(
        self, _result: Any, _logits: torch.Tensor, metadata: Any, *args: Any, **kwargs: Any
    ) -> None:
        self.replay_steps[-1].sampling_metadata = snapshot(metadata)


def snapshot(value: Any) -> Any:
    """A copy that later in-place updates of the original cannot reach: tensors cloned,
    dataclasses and containers rebuilt; other objects (ints, generators) shared."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: snapshot(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    if isinstance(value, list):
        # Token lists are flat: copy them in C instead of element by element.
        if not value or isinstance(value[0], (int, float)):
            return list(value)
        return [snapshot(v) for v in value]
    if isinstance(value, tuple):
        return tuple(snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    return value


def _instrument(llm: Any, timers: ExclusiveTimers, recorder: Recorder | None) -> Patches:
    """Wraps the engine's methods (in-process engine) with timers and, optionally, recorders."""
    patches = Patches()
    llm_engine = llm.llm_engine
    patches.wrap(llm_engine, "step", timers, "frontend_other")
    patches.wrap(llm_engine.output_processor, "process_outputs", timers, "output_processing")
    core = getattr(llm_engine.engine_core, "engine_core", None)
    if core is None:  # multiprocess: only the frontend is in this process
        patches.wrap(llm_engine.engine_core, "get_output", timers, "wait_for_engine")
        return patches
    for name in ("step", "step_with_batch_queue"):
        if hasattr(core, name):
            patches.wrap(core, name, timers, "core_other")
    scheduler = core.scheduler
    patches.wrap(scheduler, "schedule", timers, "schedule", recorder.on_schedule if recorder else None)
    patches.wrap(scheduler, "update_from_output", timers, "update_from_output")
    executor = core.executor
    if hasattr(executor, "execute_model_async"):
        submit = executor.execute_model_async

        def execute_model_async(scheduler_output: Any, *args: Any) -> Any:
            future = submit(scheduler_output, *args)
            future.result = timers.wrap(future.result, "wait_for_model")
            return future

        patches.replace(executor, "execute_model_async", execute_model_async)
    runner = core.executor.worker.model_runner
    for name in ("execute_model", "sample_tokens"):
        if hasattr(runner, name):
            patches.wrap(runner, name, timers, "runner_other")
    for name in ("_update_states", "_prepare_inputs"):
        patches.wrap(runner, name, timers, "prepare_inputs")
    patches.wrap(
        runner,
        "_build_attn_metadata",
        timers,
        "prepare_inputs",
        recorder.on_build_metadata if recorder else None,
    )
    patches.wrap(runner.model, "forward", timers, "forward", recorder.on_forward if recorder else None)
    patches.wrap(runner.model, "compute_logits", timers, "forward")
    patches.wrap(runner.sampler, "forward", timers, "sampling", recorder.on_sample if recorder else None)
    return patches


@dataclass
class OverheadResult:
    model: str
    dtype: str
    num_requests: int
    num_steps: int
    num_prompt_tokens: int
    num_output_tokens: int
    num_forward_tokens: int  # tokens the recorded forwards computed (== the ideal loop's)
    total_flops: float
    gemm_flops_per_s: float
    engine_seconds: float  # (a): multiprocess LLM.generate (or in-process with --no-multiprocessing)
    inproc_seconds: float  # in-process LLM.generate, instrumented, recording time excluded
    ideal_seconds: float  # (b)
    engine_round_seconds: list[float]  # (a) per round (best above)
    ideal_round_seconds: list[float]  # (b) per round (best above)
    breakdown: dict[str, float]
    breakdown_threads: dict[str, str]  # row -> "main", "worker" or "main+worker"
    recording_seconds: float  # spent recording replay inputs, excluded from inproc_seconds
    frontend_breakdown: dict[str, float]  # the frontend's own time in the multiprocess run
    missing_hooks: list[str]

    @property
    def overhead_fraction(self) -> float:
        return 1.0 - self.ideal_seconds / self.engine_seconds

    @property
    def inproc_overhead_fraction(self) -> float:
        return 1.0 - self.ideal_seconds / self.inproc_seconds

    def compute_fraction(self, seconds: float) -> float:
        return self.total_flops / seconds / self.gemm_flops_per_s


def _make_llm(args: argparse.Namespace, model: str, multiprocessing: bool, **engine_args: Any) -> Any:
    from pagedserve import LLM
    from pagedserve.engine.arg_utils import EngineArgs

    kwargs: dict[str, Any] = dict(
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        **engine_args,
    )
    if args.async_scheduling is not None:
        if "async_scheduling" not in EngineArgs.__dataclass_fields__:
            raise ValueError("--async-scheduling: this engine has no async_scheduling setting")
        kwargs["async_scheduling"] = args.async_scheduling
    with environment(PAGEDSERVE_ENABLE_MULTIPROCESSING="1" if multiprocessing else "0"):
        return LLM(model, **kwargs)


def _generate(llm: Any, workload: Workload) -> float:
    from pagedserve import SamplingParams

    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in workload.output_lens]
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != workload.num_output_tokens:
        raise RuntimeError(f"the engine produced {produced} tokens, expected {workload.num_output_tokens}")
    return elapsed


def _warm_up(llm: Any, workload: Workload, max_num_seqs: int) -> None:
    """A full batch of short requests: the first prefill chunk and decode batch reach the timed
    run's largest shapes (allocator and thread pools warm) at a fraction of its cost."""
    num_reqs = min(len(workload.prompts), max_num_seqs)
    warm = Workload([p[:32] for p in workload.prompts[:num_reqs]], [2] * num_reqs)
    _generate(llm, warm)
    llm.reset_prefix_cache()  # the timed run must not hit the warm-up's prompts


def _breakdown(timers: ExclusiveTimers, total: float) -> dict[str, float]:
    rows = {name: timers.seconds.get(name, 0.0) for name, _ in ROWS if name != "unattributed"}
    # Recording on the executor thread delays the future the main thread waits on.
    rows["wait_for_model"] = max(0.0, rows["wait_for_model"] - timers.seconds.get(_CAPTURE_WORKER, 0.0))
    main_thread = timers.main_thread_seconds - timers.seconds.get(_CAPTURE, 0.0)
    rows["unattributed"] = max(0.0, total - main_thread)
    return rows


class IdealLoop:
    """Only model forward + compute_logits + sampler over the recorded steps, nothing else:
    attention metadata and logits indices are built here, before any clock starts."""

    def __init__(self, runner: Any, steps: list[ReplayStep]) -> None:
        self.model, self.sampler, self.device = runner.model, runner.sampler, runner.device
        self.prepared = [
            (
                runner._build_attn_metadata(step.commons),
                step.model_args,
                step.model_kwargs,
                (step.common.query_start_loc[1:] - 1).to(self.device),
                step.sampling_metadata,
            )
            for step in steps
        ]
        with torch.inference_mode():  # warm-up
            for attn_metadata, model_args, model_kwargs, _, _ in self.prepared[:2]:
                with set_forward_context(attn_metadata):
                    self.model(*model_args, **model_kwargs)

    @torch.inference_mode()
    def __call__(self) -> float:
        model, sampler = self.model, self.sampler
        start = time.perf_counter()
        for attn_metadata, model_args, model_kwargs, logits_indices, sampling_metadata in self.prepared:
            with set_forward_context(attn_metadata):
                hidden_states = model(*model_args, **model_kwargs)
            logits = model.compute_logits(hidden_states[logits_indices])
            sampler(logits, sampling_metadata)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def run(args: argparse.Namespace) -> OverheadResult:
    """Records and profiles the in-process engine, then alternates (a) and (b) `--rounds` times
    and keeps the best of each (the machine is shared: noise only ever adds time, and the two
    are measured side by side), then the GEMM probe.

    Both engines stay loaded throughout; the prefix cache is reset before every timed run, so no
    run reuses another's prompts (the workload's prompts are random: a 0% hit rate)."""
    from pagedserve.config.model import ModelConfig

    with resolve_model(args.model) as model:
        model_config = ModelConfig(model, dtype=args.dtype, max_model_len=args.max_model_len)
        workload = make_workload(
            args.num_prompts, args.input_len, args.output_len, args.range_ratio, model_config.vocab_size, args.seed
        )  # fmt: skip
        engines = []
        try:
            llm = _make_llm(args, model, multiprocessing=False)
            engines.append(llm)
            mp_llm = _make_llm(args, model, multiprocessing=True) if args.multiprocessing else None
            if mp_llm is not None:
                engines.append(mp_llm)
            for engine in engines:
                _warm_up(engine, workload, args.max_num_seqs)

            timers, recorder = ExclusiveTimers(), Recorder()
            patches = _instrument(llm, timers, recorder)
            try:
                inproc_total = _generate(llm, workload)
            finally:
                patches.undo()
            recording = timers.seconds.get(_CAPTURE, 0.0) + timers.seconds.get(_CAPTURE_WORKER, 0.0)
            inproc_seconds = inproc_total - recording
            _check_recording(recorder)
            steps = recorder.replay_steps
            runner = llm.llm_engine.engine_core.engine_core.executor.worker.model_runner
            ideal_loop = IdealLoop(runner, steps)

            frontend_timers = ExclusiveTimers()
            engine_times, ideal_times = _timed_rounds(mp_llm, ideal_loop, workload, args.rounds, frontend_timers)
            flops = ModelFlops.from_model(runner.model, model_config.hf_config)
            total_flops = sum(flops.step_flops(s.query_lens, s.num_computed_tokens) for s in steps)
        finally:
            for engine in engines:
                engine.llm_engine.shutdown()

    dtype = model_config.torch_dtype
    gemm = measure_gemm_flops(dtype, args.gemm_size)
    rounds = len(ideal_times)
    frontend = {
        name: frontend_timers.seconds.get(name, 0.0) / rounds
        for name in ("output_processing", "frontend_other", "wait_for_engine")
    }
    return OverheadResult(
        model=args.model or "smollm2",
        dtype=str(dtype).removeprefix("torch."),
        num_requests=len(workload.prompts),
        num_steps=len(steps),
        num_prompt_tokens=workload.num_prompt_tokens,
        num_output_tokens=workload.num_output_tokens,
        num_forward_tokens=sum(sum(s.query_lens) for s in steps),
        total_flops=total_flops,
        gemm_flops_per_s=gemm,
        engine_seconds=min(engine_times) if engine_times else inproc_seconds,
        inproc_seconds=inproc_seconds,
        ideal_seconds=min(ideal_times),
        engine_round_seconds=engine_times,
        ideal_round_seconds=ideal_times,
        breakdown=_breakdown(timers, inproc_seconds),
        breakdown_threads={name: "+".join(sorted(timers.threads.get(name, {"main"}))) for name, _ in ROWS},
        recording_seconds=recording,
        frontend_breakdown=frontend if mp_llm is not None else {},
        missing_hooks=patches.missing,
    )


def _timed_rounds(
    mp_llm: Any, ideal_loop: IdealLoop, workload: Workload, rounds: int, frontend_timers: ExclusiveTimers
) -> tuple[list[float], list[float]]:
    """(a) the engine with its processes, if any, and (b) the ideal loop, alternating; the
    frontend's time of every (a) run goes to `frontend_timers`."""
    engine_times: list[float] = []
    ideal_times: list[float] = []
    for _ in range(max(1, rounds)):
        if mp_llm is not None:
            mp_llm.reset_prefix_cache()
            frontend_patches = _instrument(mp_llm, frontend_timers, None)
            try:
                engine_times.append(_generate(mp_llm, workload))
            finally:
                frontend_patches.undo()
        ideal_times.append(ideal_loop())
    return engine_times, ideal_times


def _check_recording(recorder: Recorder) -> None:
    """The replay must run exactly the engine's steps: same count, same tokens per step."""
    steps = recorder.replay_steps
    if not steps:
        raise RuntimeError("no step was recorded: did the model runner stop calling _build_attn_metadata?")
    if any(not s.model_args or s.sampling_metadata is None for s in steps):
        raise RuntimeError("a recorded step lacks its forward inputs or sampling metadata")
    sched = [sum(n for n, _ in s) for s in recorder.scheduler_steps]
    replay = [sum(s.query_lens) for s in steps]
    if sorted(sched) != sorted(replay):
        raise RuntimeError(
            f"recorded scheduler steps ({len(sched)}, {sum(sched)} tokens) and forwards "
            f"({len(replay)}, {sum(replay)} tokens) disagree"
        )


def print_report(r: OverheadResult) -> None:
    tokens = r.num_prompt_tokens + r.num_output_tokens
    print(
        f"model={r.model} dtype={r.dtype} requests={r.num_requests} steps={r.num_steps} "
        f"prompt tokens={r.num_prompt_tokens} output tokens={r.num_output_tokens} threads={torch.get_num_threads()}"
    )
    print(
        f"GEMM peak (torch.mm, {r.dtype}): {r.gemm_flops_per_s / 1e9:.1f} GFLOP/s; "
        f"workload {r.total_flops / 1e9:.1f} GFLOP ({r.total_flops / tokens / 1e6:.2f} MFLOP/token)"
    )
    # Every prompt token and every sampled token but the last one of each request is computed once.
    needed = r.num_prompt_tokens + r.num_output_tokens - r.num_requests
    print(f"tokens through the forwards: {r.num_forward_tokens} (the workload needs {needed})")
    print(f"{'':<34}{'seconds':>9}{'output tok/s':>14}{'total tok/s':>13}{'% of GEMM':>11}")
    rows = [("(a) engine, LLM.generate", r.engine_seconds)]
    if r.inproc_seconds != r.engine_seconds:
        rows.append(("    engine in-process (profiled)", r.inproc_seconds))
    rows.append(("(b) ideal loop (fwd+logits+sample)", r.ideal_seconds))
    for label, seconds in rows:
        print(
            f"{label:<34}{seconds:9.2f}{r.num_output_tokens / seconds:14.1f}{tokens / seconds:13.1f}"
            f"{100 * r.compute_fraction(seconds):10.1f}%"
        )
    if len(r.ideal_round_seconds) > 1:
        rounds = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(r.engine_round_seconds, r.ideal_round_seconds))
        print(f"rounds (a)/(b) seconds: {rounds or ', '.join(f'{b:.2f}' for b in r.ideal_round_seconds)}")
    print(
        f"overhead 1 - b/a = {100 * r.overhead_fraction:.1f}%   (in-process: {100 * r.inproc_overhead_fraction:.1f}%)"
        f"   ideal/engine speed ratio = {r.engine_seconds / r.ideal_seconds:.2f}x"
    )
    print(
        f"\nin-process engine time per step ({r.num_steps} steps, {r.inproc_seconds:.2f} s; "
        f"recording replay inputs took {r.recording_seconds:.2f} s more, excluded). Rows on the "
        "worker thread overlap rows on the main thread, so the shares may sum past 100%."
    )
    print(f"  {'':<20}{'thread':>12}{'ms/step':>9}{'share':>8}   what")
    for name, what in ROWS:
        seconds = r.breakdown.get(name, 0.0)
        print(
            f"  {name:<20}{r.breakdown_threads.get(name, ''):>12}{1e3 * seconds / r.num_steps:9.3f}"
            f"{100 * seconds / r.inproc_seconds:7.1f}%   {what}"
        )
    print(
        f"  {'ideal loop':<20}{'':>12}{1e3 * r.ideal_seconds / r.num_steps:9.3f}"
        f"{100 * r.ideal_seconds / r.inproc_seconds:7.1f}%   (b): compare with forward + sampling"
    )
    if r.frontend_breakdown:
        print(
            "multiprocess frontend, ms/step (runs alongside the engine-core process): "
            + ", ".join(f"{k} {1e3 * v / r.num_steps:.3f}" for k, v in r.frontend_breakdown.items())
        )
    if r.missing_hooks:
        print(f"not instrumented (absent in this engine): {', '.join(r.missing_hooks)}")


@dataclass
class ExecutorResult:
    backend: str
    seconds: float  # the workload through LLM.generate
    num_steps: int  # engine steps that computed tokens
    empty_step_seconds: float  # median round trip of a step without tokens

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.num_steps


def run_executor_comparison(args: argparse.Namespace) -> list[ExecutorResult]:
    """Each backend in turn (one engine alive at a time): warm-up, `--rounds` timed runs of the
    workload (best kept), then empty-step round trips."""
    from pagedserve.config.model import ModelConfig
    from pagedserve.core.sched.output import CachedRequestData, SchedulerOutput

    results = []
    with resolve_model(args.model) as model:
        model_config = ModelConfig(model, dtype=args.dtype, max_model_len=args.max_model_len)
        workload = make_workload(
            args.num_prompts, args.input_len, args.output_len, args.range_ratio, model_config.vocab_size, args.seed
        )  # fmt: skip
        for backend in args.executor_backends:
            llm = _make_llm(
                args,
                model,
                multiprocessing=False,
                tensor_parallel_size=args.tensor_parallel_size,
                distributed_executor_backend=backend,
            )
            try:
                core = llm.llm_engine.engine_core.engine_core
                _warm_up(llm, workload, args.max_num_seqs)
                recorder, patches = Recorder(), Patches()  # counts the steps that computed tokens
                patches.wrap(core.scheduler, "schedule", ExclusiveTimers(), "schedule", recorder.on_schedule)
                times = []
                try:
                    for _ in range(max(1, args.rounds)):
                        llm.reset_prefix_cache()
                        recorder.scheduler_steps.clear()
                        times.append(_generate(llm, workload))
                finally:
                    patches.undo()
                num_steps = len(recorder.scheduler_steps)
                empty = SchedulerOutput([], CachedRequestData(), {}, 0, set(), set())
                round_trips = []
                for _ in range(args.num_empty_steps):
                    start = time.perf_counter()
                    core.executor.execute_model(empty)
                    round_trips.append(time.perf_counter() - start)
                round_trips.sort()
                results.append(ExecutorResult(backend, min(times), num_steps, round_trips[len(round_trips) // 2]))
            finally:
                llm.llm_engine.shutdown()
    return results


def print_executor_report(args: argparse.Namespace, results: list[ExecutorResult]) -> None:
    print(
        f"model={args.model or 'smollm2'} tensor_parallel_size={args.tensor_parallel_size} "
        f"requests={args.num_prompts} (~{args.input_len} in / ~{args.output_len} out), best of {args.rounds}"
    )
    base = results[0]
    print(f"{'executor':<10}{'seconds':>9}{'steps':>7}{'ms/step':>9}{'vs ' + base.backend:>9}{'empty step':>13}{'vs ' + base.backend:>9}")
    for r in results:
        print(
            f"{r.backend:<10}{r.seconds:9.2f}{r.num_steps:7d}{r.ms_per_step:9.2f}{r.ms_per_step / base.ms_per_step:8.2f}x"
            f"{1e3 * r.empty_step_seconds:10.3f} ms{r.empty_step_seconds / base.empty_step_seconds:8.2f}x"
        )
    for r in results[1:]:
        print(
            f"{r.backend} - {base.backend}: {r.ms_per_step - base.ms_per_step:+.2f} ms per engine step, "
            f"{1e3 * (r.empty_step_seconds - base.empty_step_seconds):+.3f} ms per empty step"
        )


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--model",
        default=None,
        help="'tiny' (random 2-layer hidden-256 Llama), 'smollm2' (default) or a checkpoint path",
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="concurrent requests in the engine")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.5, help="lengths vary in mean*(1±ratio)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", help="engine dtype (the GEMM probe uses the same)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="engine setting (default: the engine's default)",
    )
    parser.add_argument(
        "--multiprocessing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time (a) with the engine-core process; --no-multiprocessing uses the in-process run",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate (a) and (b) N times and keep the best of each"
    )
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument(
        "--executor-backends",
        nargs="+",
        default=None,
        choices=["mp", "ray"],
        help="compare these executors (ms per step, empty-step round trip) instead of the overhead run",
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=2, help="with --executor-backends")
    parser.add_argument("--num-empty-steps", type=int, default=200, help="with --executor-backends")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    logging.getLogger("pagedserve").setLevel(logging.WARNING)
    if args.executor_backends:
        executor_results = run_executor_comparison(args)
        print_executor_report(args, executor_results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in executor_results], f, indent=2)
        return 0
    result = run(args)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(result), "overhead_fraction": result.overhead_fraction}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(add_cli_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
