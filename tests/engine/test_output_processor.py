"""OutputProcessor: EngineCoreOutputs -> RequestOutputs with the real SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from pagedserve.engine.logprobs import LogprobsProcessor, TokenDecodeCache
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.parallel_sampling import ParentRequest
from pagedserve.outputs import Logprob, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.tokenizer import get_tokenizer

PROMPT = "Tell me a story:"
TEXT = " Once upon a time, 世界 was 😀 happy. The end of the story"


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: str) -> PreTrainedTokenizerBase:
    return get_tokenizer(smollm2_tokenizer_dir)


def make_request(
    tokenizer: PreTrainedTokenizerBase, request_id: str = "req-0", **params: object
) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=tokenizer.encode(PROMPT, add_special_tokens=False),
        sampling_params=SamplingParams(**params),  # type: ignore[arg-type]
        eos_token_id=tokenizer.eos_token_id,
        arrival_time=time.monotonic(),
    )


def run_steps(
    processor: OutputProcessor,
    request_id: str,
    token_ids: list[int],
    finish_reason: FinishReason = FinishReason.LENGTH,
    stop_reason: int | str | None = None,
) -> list[RequestOutput]:
    """One engine step per token; the engine finishes the request on the last one."""
    outputs = []
    for i, token_id in enumerate(token_ids):
        last = i == len(token_ids) - 1
        eco = EngineCoreOutput(
            request_id=request_id,
            new_token_ids=[token_id],
            finish_reason=finish_reason if last else None,
            stop_reason=stop_reason if last else None,
        )
        result = processor.process_outputs([eco])
        assert result.reqs_to_abort == []
        outputs += result.request_outputs
    return outputs


def test_cumulative_outputs_carry_everything_so_far(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    request = make_request(tokenizer)
    processor.add_request(request, PROMPT)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    outputs = run_steps(processor, "req-0", ids)

    assert len(outputs) == len(ids)
    for n, out in enumerate(outputs, start=1):
        assert out.request_id == "req-0"
        assert out.prompt == PROMPT and out.prompt_token_ids == request.prompt_token_ids
        assert out.outputs[0].token_ids == ids[:n]
        assert "\ufffd" not in out.outputs[0].text
        assert tokenizer.decode(ids[:n]).startswith(out.outputs[0].text)
        assert out.finished is (n == len(ids))
    final = outputs[-1]
    assert final.outputs[0].text == TEXT
    assert final.outputs[0].finish_reason == "length"
    assert final.outputs[0].cumulative_logprob is None and final.outputs[0].logprobs is None
    assert final.metrics is None
    # Earlier outputs are snapshots, not views of lists that keep growing.
    assert outputs[0].outputs[0].token_ids == ids[:1]
    assert not processor.has_unfinished_requests()


def test_delta_outputs_concatenate_to_the_final_text(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, output_kind=RequestOutputKind.DELTA), PROMPT)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    outputs = run_steps(processor, "req-0", ids)

    assert len(outputs) == len(ids)
    assert all(len(o.outputs[0].token_ids) == 1 for o in outputs)
    assert all("\ufffd" not in o.outputs[0].text for o in outputs)
    assert "".join(o.outputs[0].text for o in outputs) == TEXT
    assert [t for o in outputs for t in o.outputs[0].token_ids] == ids
    assert [o.finished for o in outputs] == [False] * (len(ids) - 1) + [True]


def test_final_only_emits_one_output_when_finished(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, output_kind=RequestOutputKind.FINAL_ONLY), PROMPT)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    outputs = run_steps(processor, "req-0", ids)
    assert len(outputs) == 1
    assert outputs[0].finished and outputs[0].outputs[0].text == TEXT
    assert outputs[0].outputs[0].token_ids == ids


@pytest.mark.parametrize("output_kind", list(RequestOutputKind))
def test_stop_string_finishes_the_request_and_asks_the_engine_to_abort_it(
    tokenizer: PreTrainedTokenizerBase, output_kind: RequestOutputKind
) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, stop=["a time"], output_kind=output_kind), PROMPT)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    outputs: list[RequestOutput] = []
    aborted: list[str] = []
    for token_id in ids:
        result = processor.process_outputs([EngineCoreOutput("req-0", [token_id])])
        outputs += result.request_outputs
        aborted += result.reqs_to_abort
        if result.reqs_to_abort:
            break
    assert aborted == ["req-0"]
    assert not processor.has_unfinished_requests()
    final = outputs[-1]
    assert final.finished
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == "a time"
    if output_kind == RequestOutputKind.DELTA:
        text = "".join(o.outputs[0].text for o in outputs)
    else:
        text = final.outputs[0].text
    assert text == " Once upon "
    # Outputs the engine core produced before it saw the abort are dropped.
    late = processor.process_outputs([EngineCoreOutput("req-0", [ids[0]])])
    assert late.request_outputs == [] and late.reqs_to_abort == []


def test_stop_string_in_the_engines_last_step_needs_no_abort(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, stop=["upon"]), PROMPT)
    ids = tokenizer.encode(" Once upon a", add_special_tokens=False)
    result = processor.process_outputs([EngineCoreOutput("req-0", ids, finish_reason=FinishReason.LENGTH)])
    assert result.reqs_to_abort == []
    (out,) = result.request_outputs
    assert out.outputs[0].text == " Once "
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == "upon"


def test_eos_is_in_token_ids_but_not_in_text(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, skip_special_tokens=False), PROMPT)
    ids = tokenizer.encode(" Bye.", add_special_tokens=False) + [tokenizer.eos_token_id]
    outputs = run_steps(processor, "req-0", ids, FinishReason.STOP)
    completion = outputs[-1].outputs[0]
    assert completion.text == " Bye."
    assert completion.token_ids == ids
    assert completion.finish_reason == "stop" and completion.stop_reason is None


def test_stop_token_id_is_reported_as_stop_reason(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    period = tokenizer.encode(".", add_special_tokens=False)[0]
    processor.add_request(make_request(tokenizer, stop_token_ids=[period]), PROMPT)
    ids = tokenizer.encode(" Bye.", add_special_tokens=False)
    outputs = run_steps(processor, "req-0", ids, FinishReason.STOP, stop_reason=period)
    completion = outputs[-1].outputs[0]
    assert completion.text == " Bye" and completion.stop_reason == period


def _raw_logprobs(
    sampled: int, sampled_logprob: float, sampled_rank: int, top: list[tuple[int, float]]
) -> tuple[list[int], list[float], int]:
    return [sampled] + [t for t, _ in top], [sampled_logprob] + [lp for _, lp in top], sampled_rank


def test_logprobs_become_dicts_with_ranks_and_decoded_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, logprobs=2, output_kind=RequestOutputKind.DELTA), PROMPT)
    hello, world, comma, bang = tokenizer.encode("Hello world,!", add_special_tokens=False)
    step1 = _raw_logprobs(hello, -0.5, 1, [(hello, -0.5), (world, -1.5)])
    step2 = _raw_logprobs(world, -2.0, 3, [(comma, -0.25), (bang, -1.0)])

    out1 = processor.process_outputs([EngineCoreOutput("req-0", [hello], new_logprobs=[step1])])
    (lp1,) = out1.request_outputs[0].outputs[0].logprobs  # type: ignore[misc]
    assert lp1 == {hello: Logprob(-0.5, 1, "Hello"), world: Logprob(-1.5, 2, " world")}

    out2 = processor.process_outputs(
        [EngineCoreOutput("req-0", [world], new_logprobs=[step2], finish_reason=FinishReason.LENGTH)]
    )
    completion = out2.request_outputs[0].outputs[0]
    assert completion.logprobs == [
        {world: Logprob(-2.0, 3, " world"), comma: Logprob(-0.25, 1, ","), bang: Logprob(-1.0, 2, "!")}
    ]
    assert completion.cumulative_logprob == pytest.approx(-2.5)


def test_cumulative_logprobs_cover_all_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, logprobs=0), PROMPT)
    ids = tokenizer.encode(" 世界", add_special_tokens=False)
    for i, token_id in enumerate(ids):
        eco = EngineCoreOutput("req-0", [token_id], new_logprobs=[([token_id], [-0.1 * (i + 1)], i + 1)])
        result = processor.process_outputs([eco])
    completion = result.request_outputs[0].outputs[0]
    assert [list(d) for d in completion.logprobs or []] == [[t] for t in ids]
    assert [d[t].rank for d, t in zip(completion.logprobs or [], ids)] == list(range(1, len(ids) + 1))
    # A single byte-level token of a multi-byte character decodes to U+FFFD, as in vLLM.
    assert completion.logprobs and completion.logprobs[1][ids[1]].decoded_token == tokenizer.decode([ids[1]])
    assert completion.cumulative_logprob == pytest.approx(-0.1 * sum(range(1, len(ids) + 1)))


@pytest.mark.parametrize("output_kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_prompt_logprobs_arrive_in_chunks_and_start_with_none(
    tokenizer: PreTrainedTokenizerBase, output_kind: RequestOutputKind
) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    request = make_request(tokenizer, prompt_logprobs=1, output_kind=output_kind)
    processor.add_request(request, PROMPT)
    prompt_ids = request.prompt_token_ids
    top = 905  # " story", not in the prompt: the top-1 entry differs from the actual token
    assert top not in prompt_ids
    raw = [_raw_logprobs(t, -float(i), i + 1, [(top, -0.01)]) for i, t in enumerate(prompt_ids[1:], start=1)]
    # Chunked prefill: the first chunk produces no token and no output.
    first = processor.process_outputs([EngineCoreOutput("req-0", [], new_prompt_logprobs=raw[:2])])
    assert first.request_outputs == []
    second = processor.process_outputs([EngineCoreOutput("req-0", [905], new_prompt_logprobs=raw[2:])])
    prompt_logprobs = second.request_outputs[0].prompt_logprobs
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(prompt_ids)
    assert prompt_logprobs[0] is None
    for pos, token_id in enumerate(prompt_ids[1:], start=1):
        entry = prompt_logprobs[pos]
        assert entry == {
            token_id: Logprob(-float(pos), pos + 1, tokenizer.decode([token_id])),
            top: Logprob(-0.01, 1, tokenizer.decode([top])),
        }
    third = processor.process_outputs([EngineCoreOutput("req-0", [905], finish_reason=FinishReason.LENGTH)])
    later = third.request_outputs[0].prompt_logprobs
    assert later is None if output_kind == RequestOutputKind.DELTA else later == prompt_logprobs


def test_token_decode_cache_batch_decodes_many_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    cache = TokenDecodeCache(tokenizer)
    ids = list(range(100, 400))
    cache.decode_missing(ids + ids[:10])
    assert [cache.get(t) for t in ids] == [tokenizer.decode([t]) for t in ids]
    processor = LogprobsProcessor.from_new_request(tokenizer, SamplingParams(), cache)
    assert processor.logprobs is None and processor.prompt_logprobs is None
    assert processor.cumulative_logprob is None


def test_parent_request_child_ids_and_params() -> None:
    params = SamplingParams(n=3, seed=7, prompt_logprobs=2, stop=["x"])
    parent = ParentRequest("p", params)
    infos = [parent.get_child_info(i) for i in range(3)]
    assert [cid for cid, _ in infos] == ["0_p", "1_p", "2_p"]
    assert [cp.seed for _, cp in infos] == [7, 8, 9]
    assert all(cp.n == 1 and cp.stop == ["x"] for _, cp in infos)
    assert [cp.prompt_logprobs for _, cp in infos] == [2, None, None]
    assert params.n == 3 and params.seed == 7
    assert parent.child_requests == {"0_p", "1_p", "2_p"}
    unseeded = ParentRequest("q", SamplingParams(n=2))
    assert all(unseeded.get_child_info(i)[1].seed is None for i in range(2))


def _add_parent(
    processor: OutputProcessor,
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    queue: asyncio.Queue | None = None,
    **params: object,
) -> ParentRequest:
    request = make_request(tokenizer, "p", n=n, **params)
    assert request.sampling_params is not None
    parent = ParentRequest("p", request.sampling_params)
    for index, child in enumerate(parent.make_child_requests(request)):
        processor.add_request(child, PROMPT, parent, index, queue)
    return parent


def _child_texts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    texts = [" first answer 😀", " second", " the third one, longest of all"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _run_children(processor: OutputProcessor, children_ids: list[list[int]]) -> list[RequestOutput]:
    """All children step together; each finishes (length) on its last token. Child 2 is listed
    first in every step to check that outputs are put back in index order."""
    outputs = []
    for step in range(max(len(ids) for ids in children_ids)):
        ecos = []
        for index in reversed(range(len(children_ids))):
            ids = children_ids[index]
            if step < len(ids):
                finish = FinishReason.LENGTH if step == len(ids) - 1 else None
                ecos.append(EngineCoreOutput(f"{index}_p", [ids[step]], finish_reason=finish))
        outputs += processor.process_outputs(ecos).request_outputs
    return outputs


def test_n_final_only_aggregates_all_children_once(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=True)
    _add_parent(processor, tokenizer, 3, output_kind=RequestOutputKind.FINAL_ONLY)
    assert processor.get_num_unfinished_requests() == 3
    children_ids = _child_texts(tokenizer)
    outputs = _run_children(processor, children_ids)
    assert len(outputs) == 1
    (out,) = outputs
    assert out.request_id == "p" and out.finished and out.prompt == PROMPT
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == children_ids
    assert [c.text for c in out.outputs] == [tokenizer.decode(ids) for ids in children_ids]
    assert out.metrics is not None and out.metrics.finished_time is not None
    assert out.metrics.num_generation_tokens == sum(len(ids) for ids in children_ids)
    assert not processor.has_unfinished_requests() and not processor.parent_requests


def test_n_cumulative_reports_every_child_in_index_order(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    _add_parent(processor, tokenizer, 3)
    children_ids = _child_texts(tokenizer)
    outputs = _run_children(processor, children_ids)
    assert len(outputs) == max(len(ids) for ids in children_ids)  # one per step
    for out in outputs:
        assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    final = outputs[-1]
    assert [c.text for c in final.outputs] == [tokenizer.decode(ids) for ids in children_ids]
    assert all(c.finish_reason == "length" for c in final.outputs)


def test_n_delta_reports_children_with_new_output(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    _add_parent(processor, tokenizer, 3, output_kind=RequestOutputKind.DELTA)
    children_ids = _child_texts(tokenizer)
    outputs = _run_children(processor, children_ids)
    texts = ["", "", ""]
    for out in outputs:
        indices = [c.index for c in out.outputs]
        assert indices == sorted(indices)
        for c in out.outputs:
            texts[c.index] += c.text
    assert texts == [tokenizer.decode(ids) for ids in children_ids]
    # The last steps only have the longest child left.
    assert [c.index for c in outputs[-1].outputs] == [2] and outputs[-1].finished


def test_n_stop_string_aborts_only_the_child_that_hit_it(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    _add_parent(processor, tokenizer, 2, stop=["answer"])
    a = tokenizer.encode(" an answer", add_special_tokens=False)
    result = processor.process_outputs(
        [
            EngineCoreOutput("0_p", a),
            EngineCoreOutput("1_p", tokenizer.encode(" no", add_special_tokens=False)),
        ]
    )
    assert result.reqs_to_abort == ["0_p"]
    (out,) = result.request_outputs
    assert not out.finished
    assert out.outputs[0].text == " an " and out.outputs[0].stop_reason == "answer"
    assert processor.get_num_unfinished_requests() == 1


def test_abort_parent_maps_to_its_unfinished_children(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    _add_parent(processor, tokenizer, 3)
    processor.process_outputs([EngineCoreOutput("1_p", [905], finish_reason=FinishReason.LENGTH)])
    engine_ids, _ = processor.abort_requests(["p", "unknown"])
    assert sorted(engine_ids) == ["0_p", "2_p"]
    assert not processor.has_unfinished_requests() and not processor.parent_requests
    assert processor.abort_requests(["p"]) == ([], [])


def test_outputs_go_to_the_queue_when_one_is_given(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    queue: asyncio.Queue = asyncio.Queue()
    processor.add_request(make_request(tokenizer, output_kind=RequestOutputKind.DELTA), PROMPT, queue=queue)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert run_steps(processor, "req-0", ids) == []
    streamed = [queue.get_nowait() for _ in range(queue.qsize())]
    assert "".join(o.outputs[0].text for o in streamed) == TEXT
    assert streamed[-1].finished


def test_aborting_a_queued_request_puts_a_final_abort_output(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=True)
    queue: asyncio.Queue = asyncio.Queue()
    processor.add_request(make_request(tokenizer), PROMPT, queue=queue)
    processor.process_outputs([EngineCoreOutput("req-0", [905])])
    queue.get_nowait()
    engine_ids, aborted = processor.abort_requests(["req-0"])
    assert engine_ids == ["req-0"]
    # The metrics count it: an abort with its prompt and the one token it generated.
    num_prompt_tokens = len(tokenizer.encode(PROMPT, add_special_tokens=False))
    assert [
        (a.request_id, a.finish_reason, a.num_prompt_tokens, a.num_generation_tokens) for a in aborted
    ] == [("req-0", FinishReason.ABORT, num_prompt_tokens, 1)]
    out = queue.get_nowait()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert out.outputs[0].token_ids == [905]

    parent_queue: asyncio.Queue = asyncio.Queue()
    _add_parent(processor, tokenizer, 2, queue=parent_queue, output_kind=RequestOutputKind.FINAL_ONLY)
    engine_ids, aborted = processor.abort_requests(["p"])
    assert sorted(engine_ids) == sorted(a.request_id for a in aborted) == ["0_p", "1_p"]
    out = parent_queue.get_nowait()
    assert out.request_id == "p" and out.finished
    assert [c.finish_reason for c in out.outputs] == ["abort", "abort"]


def test_propagate_error_reaches_every_queue(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    queue: asyncio.Queue = asyncio.Queue()
    processor.add_request(make_request(tokenizer, "a"), PROMPT, queue=queue)
    processor.add_request(make_request(tokenizer, "b"), PROMPT, queue=queue)
    error = RuntimeError("engine core died")
    processor.propagate_error(error)
    assert queue.qsize() == 1 and queue.get_nowait() is error


def test_metrics_record_first_last_token_and_inter_token_latencies(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    processor = OutputProcessor(tokenizer, log_stats=True)
    request = make_request(tokenizer)
    processor.add_request(request, PROMPT)
    t0 = request.arrival_time
    ids = tokenizer.encode(" one two three", add_special_tokens=False)
    timestamps = [t0 + 0.5, t0 + 0.75, t0 + 1.25]
    finished_stats = []
    for i, (token_id, ts) in enumerate(zip(ids, timestamps)):
        finish = FinishReason.LENGTH if i == len(ids) - 1 else None
        result = processor.process_outputs([EngineCoreOutput("req-0", [token_id], finish_reason=finish)], ts)
        finished_stats += result.finished_requests
    metrics = result.request_outputs[0].metrics
    assert metrics is not None
    assert metrics.arrival_time == t0
    assert metrics.first_token_time == t0 + 0.5 and metrics.last_token_time == t0 + 1.25
    assert metrics.finished_time == t0 + 1.25
    assert metrics.inter_token_latencies == pytest.approx([0.25, 0.5])
    assert metrics.time_to_first_token == pytest.approx(0.5)
    assert metrics.e2e_latency == pytest.approx(1.25)
    assert metrics.num_generation_tokens == 3
    (stats,) = finished_stats
    assert stats.request_id == "req-0" and stats.finish_reason == FinishReason.LENGTH
    assert stats.num_prompt_tokens == len(request.prompt_token_ids) and stats.num_generation_tokens == 3


def test_metrics_use_the_frontend_clock_without_an_engine_timestamp(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    processor = OutputProcessor(tokenizer, log_stats=True)
    processor.add_request(make_request(tokenizer), PROMPT)
    before = time.monotonic()
    result = processor.process_outputs([EngineCoreOutput("req-0", [905], finish_reason=FinishReason.LENGTH)])
    metrics = result.request_outputs[0].metrics
    assert metrics is not None and metrics.first_token_time is not None
    assert before <= metrics.first_token_time <= time.monotonic()
    assert metrics.time_to_first_token is not None and not math.isnan(metrics.time_to_first_token)


def test_num_cached_tokens_is_reported(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer), PROMPT)
    first = processor.process_outputs([EngineCoreOutput("req-0", [905], num_cached_tokens=16)])
    second = processor.process_outputs([EngineCoreOutput("req-0", [905])])
    assert first.request_outputs[0].num_cached_tokens == 16
    assert second.request_outputs[0].num_cached_tokens == 16


def test_detokenize_false_returns_token_ids_without_text(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, detokenize=False), PROMPT)
    result = processor.process_outputs(
        [EngineCoreOutput("req-0", [905, 906], finish_reason=FinishReason.LENGTH)]
    )
    completion = result.request_outputs[0].outputs[0]
    assert completion.text == "" and completion.token_ids == [905, 906]


def test_duplicate_request_id_is_rejected(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer), PROMPT)
    with pytest.raises(ValueError, match="already running"):
        processor.add_request(make_request(tokenizer), PROMPT)


def test_a_running_request_id_cannot_be_added_again(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer, log_stats=False)
    processor.add_request(make_request(tokenizer, "x"), PROMPT)
    _add_parent(processor, tokenizer, 2)
    for request in (make_request(tokenizer, "x"), make_request(tokenizer, "p")):
        with pytest.raises(ValueError, match="already running"):
            processor.add_request(request, PROMPT)
    # n > 1 under an id that runs already (as a plain request or as another parent).
    for request_id in ("x", "p"):
        request = make_request(tokenizer, request_id, n=2)
        assert request.sampling_params is not None
        parent = ParentRequest(request_id, request.sampling_params)
        with pytest.raises(ValueError, match="already running"):
            processor.add_request(parent.make_child_requests(request)[0], PROMPT, parent, 0)
    assert processor.get_num_unfinished_requests() == 3
