"""The scheduler's structured-output paths with a stub backend (no model, no xgrammar):
WAITING_FOR_FSM, the grammar cache, the step's bitmask order, and how a matcher finishes a request."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pagedserve.config.cache import CacheConfig
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.config.structured_outputs import StructuredOutputsConfig
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine import FinishReason
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
from pagedserve.structured_output import StructuredOutputManager
from pagedserve.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    StructuredOutputKey,
)
from pagedserve.worker.outputs import ModelRunnerOutput

VOCAB_SIZE = 64
EOS = 63


class SequenceGrammar(StructuredOutputGrammar):
    """Allows exactly the token sequence given as the regex text ("1,2,3"), then EOS."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.num_processed_tokens = 0
        self.terminated = False

    def _next(self) -> int:
        return self.tokens[self.num_processed_tokens] if self.num_processed_tokens < len(self.tokens) else EOS

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        for token in tokens:
            if token != self._next():
                return False
            self.terminated = token == EOS
            self.num_processed_tokens += 1
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        bitmask[index].fill_(0)
        token = self._next()
        bit = 1 << (token % 32)
        bitmask[index, token // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # int32

    def is_terminated(self) -> bool:
        return self.terminated

    def reset(self) -> None:
        self.num_processed_tokens = 0
        self.terminated = False


class StubBackend(StructuredOutputBackend):
    def __init__(self) -> None:
        super().__init__(None, VOCAB_SIZE)
        self.release = threading.Event()
        self.release.set()
        self.compiled_keys: list[StructuredOutputKey] = []

    def compile_grammar(self, key: StructuredOutputKey) -> Any:
        assert self.release.wait(10)
        self.compiled_keys.append(key)
        if key[1] == "fail":
            raise RuntimeError("cannot compile")
        return [int(t) for t in key[1].split(",")]

    def new_grammar(self, compiled: Any, stop_token_ids: list[int]) -> StructuredOutputGrammar:
        assert stop_token_ids == [EOS]
        return SequenceGrammar(compiled)

    def allocate_token_bitmask(self, max_num_seqs: int) -> torch.Tensor:
        return torch.zeros(max_num_seqs, (VOCAB_SIZE + 31) // 32, dtype=torch.int32)


def _scheduler() -> tuple[Scheduler, StubBackend]:
    config = SimpleNamespace(
        structured_outputs_config=StructuredOutputsConfig(),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
        model_config=SimpleNamespace(vocab_size=VOCAB_SIZE),
    )
    manager = StructuredOutputManager(config)  # type: ignore[arg-type]
    backend = StubBackend()
    manager._backend = backend
    scheduler = Scheduler(
        config.scheduler_config,
        CacheConfig(block_size=4, num_gpu_blocks=64, prefix_caching_hash_seed=0),
        structured_output_manager=manager,
    )
    return scheduler, backend


def _request(request_id: str, regex: str | None = None, max_tokens: int = 8) -> Request:
    structured = StructuredOutputsParams(regex=regex) if regex is not None else None
    params = SamplingParams(max_tokens=max_tokens, structured_outputs=structured)
    return Request(request_id, [1, 2, 3], params, eos_token_id=EOS)


def _output(scheduler_output, tokens: dict[str, int]) -> ModelRunnerOutput:
    req_ids = list(scheduler_output.num_scheduled_tokens)
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[tokens[r]] if r in tokens else [] for r in req_ids],
        logprobs=None,
        prompt_logprobs_dict={},
    )


def _wait_compiled(request: Request) -> None:
    deadline = time.monotonic() + 10
    while not request.structured_output_request.is_compiled():  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the grammar never compiled"
        time.sleep(0.001)


def _allowed_token(bitmask_row: np.ndarray) -> int:
    (token,) = [t for t in range(VOCAB_SIZE) if int(bitmask_row[t // 32]) >> (t % 32) & 1]
    return token


def test_request_waits_for_its_grammar_while_the_rest_of_the_batch_runs() -> None:
    scheduler, backend = _scheduler()
    backend.release.clear()
    constrained, plain = _request("constrained", "5,6"), _request("plain")
    scheduler.add_request(constrained)
    scheduler.add_request(plain)
    assert constrained.status is RequestStatus.WAITING_FOR_FSM
    first = scheduler.schedule()
    assert list(first.num_scheduled_tokens) == ["plain"] and not first.structured_output_request_ids
    backend.release.set()
    _wait_compiled(constrained)
    scheduler.update_from_output(first, _output(first, {"plain": 9}))
    second = scheduler.schedule()
    assert "constrained" in second.num_scheduled_tokens
    assert second.structured_output_request_ids == ["constrained"]
    grammar_output = scheduler.get_grammar_bitmask(second)
    assert grammar_output is not None and grammar_output.structured_output_request_ids == ["constrained"]
    assert _allowed_token(grammar_output.grammar_bitmask[0]) == 5


def test_equal_constraints_compile_once() -> None:
    scheduler, backend = _scheduler()
    requests = [_request(f"r{i}", "5,6") for i in range(3)] + [_request("other", "7")]
    for request in requests:
        scheduler.add_request(request)
    for request in requests:
        _wait_compiled(request)
    assert sorted(key[1] for key in backend.compiled_keys) == ["5,6", "7"]
    assert scheduler.structured_output_manager.num_cache_hits == 2  # type: ignore[union-attr]


def test_matchers_advance_and_termination_finishes_the_request() -> None:
    scheduler, _ = _scheduler()
    request = _request("r", "5,6", max_tokens=20)
    scheduler.add_request(request)
    _wait_compiled(request)
    finish = None
    for token in (5, 6, EOS):
        step = scheduler.schedule()
        bitmask = scheduler.get_grammar_bitmask(step)
        assert bitmask is not None and _allowed_token(bitmask.grammar_bitmask[0]) == token
        outputs = scheduler.update_from_output(step, _output(step, {"r": token}))
        finish = outputs.outputs[0].finish_reason
    assert finish == FinishReason.STOP
    assert not scheduler.has_unfinished_requests()


def test_a_rejected_token_finishes_the_request_with_an_error() -> None:
    scheduler, _ = _scheduler()
    request = _request("r", "5,6")
    scheduler.add_request(request)
    _wait_compiled(request)
    step = scheduler.schedule()
    outputs = scheduler.update_from_output(step, _output(step, {"r": 7}))
    assert outputs.outputs[0].finish_reason == FinishReason.ERROR
    assert not scheduler.has_unfinished_requests()


def test_a_grammar_that_fails_to_compile_finishes_the_request_with_an_error() -> None:
    scheduler, _ = _scheduler()
    failing, plain = _request("failing", "fail"), _request("plain")
    scheduler.add_request(failing)
    scheduler.add_request(plain)
    _wait_compiled(failing)
    step = scheduler.schedule()
    assert list(step.num_scheduled_tokens) == ["plain"]
    outputs = scheduler.update_from_output(step, _output(step, {"plain": 9}))
    finished = {o.request_id: o.finish_reason for o in outputs.outputs if o.finished}
    assert finished == {"failing": FinishReason.ERROR}


def test_async_scheduling_marks_a_step_whose_bitmask_must_wait_for_the_token_in_flight() -> None:
    scheduler, _ = _scheduler()
    scheduler.async_scheduling = True
    request = _request("r", "5,6,7")
    scheduler.add_request(request)
    _wait_compiled(request)
    first = scheduler.schedule()
    assert first.structured_output_request_ids == ["r"] and not first.pending_structured_output_tokens
    second = scheduler.schedule()  # step 1's token is still in flight
    assert second.structured_output_request_ids == ["r"] and second.pending_structured_output_tokens
    scheduler.update_from_output(first, _output(first, {"r": 5}))
    bitmask = scheduler.get_grammar_bitmask(second)
    assert bitmask is not None and _allowed_token(bitmask.grammar_bitmask[0]) == 6
