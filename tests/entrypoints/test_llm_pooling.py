"""LLM's pooling API (embed, classify, score, encode), the frontend pieces a server reuses
(Processor, OutputProcessor, the wire encoding), and the errors for a model used against its
workflow."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from pagedserve import LLM, SamplingParams
from pagedserve.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.processor import Processor
from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder
from pagedserve.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    ScoringRequestOutput,
)
from pagedserve.pooling_params import PoolingParams
from pagedserve.tokenizer import get_tokenizer

_TEXTS = ["the first text", "a second, somewhat longer text to embed", "third", "and the last one of four"]


@pytest.fixture(scope="module")
def bert_embedder(make_tiny_encoder) -> Iterator[LLM]:
    llm = LLM(make_tiny_encoder("BertModel"))
    yield llm
    llm.llm_engine.shutdown()


@pytest.mark.slow
def test_embed_classify_score_and_encode_return_vllm_output_types_in_prompt_order(bert_embedder: LLM) -> None:
    embeddings = bert_embedder.embed(_TEXTS, use_tqdm=False)
    assert all(isinstance(o, EmbeddingRequestOutput) and o.finished for o in embeddings)
    tokenizer = bert_embedder.get_tokenizer()
    assert [o.prompt_token_ids for o in embeddings] == [tokenizer.encode(t) for t in _TEXTS]
    # One prompt at a time gives the same vectors: order and packing change nothing.
    for text, output in zip(_TEXTS, embeddings):
        (alone,) = bert_embedder.embed(text, use_tqdm=False)
        assert torch.allclose(torch.tensor(alone.outputs.embedding), torch.tensor(output.outputs.embedding), atol=1e-6)
    encoded = bert_embedder.encode(_TEXTS, use_tqdm=False)
    assert all(type(o) is PoolingRequestOutput for o in encoded)
    for raw, embedding in zip(encoded, embeddings):
        # NOTE: not bit for bit: the two calls may batch differently, and MKL's GEMM (where no
        # batch-invariant kernel runs, e.g. without AVX-512) rounds differently per batch shape.
        torch.testing.assert_close(raw.outputs.data, torch.tensor(embedding.outputs.embedding), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_per_prompt_pooling_params_apply_to_their_own_prompt(bert_embedder: LLM) -> None:
    plain, raw, short = bert_embedder.embed(
        _TEXTS[:3],
        [PoolingParams(), PoolingParams(normalize=False), PoolingParams(dimensions=8)],
        use_tqdm=False,
    )
    (raw_alone,) = bert_embedder.embed(_TEXTS[1], PoolingParams(normalize=False), use_tqdm=False)
    assert torch.tensor(plain.outputs.embedding).norm().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(
        torch.tensor(raw.outputs.embedding), torch.tensor(raw_alone.outputs.embedding), rtol=1e-5, atol=1e-6
    )
    assert torch.tensor(raw.outputs.embedding).norm().item() != pytest.approx(1.0, abs=1e-3)
    assert short.outputs.hidden_size == 8
    with pytest.raises(ValueError, match="pooling params for 2 prompts"):
        bert_embedder.embed(_TEXTS[:2], [PoolingParams()], use_tqdm=False)


@pytest.mark.slow
def test_bi_encoder_score_is_the_cosine_of_the_embeddings(bert_embedder: LLM) -> None:
    query = "what is being compared"
    scores = bert_embedder.score(query, _TEXTS, use_tqdm=False)
    assert all(isinstance(s, ScoringRequestOutput) for s in scores)
    embeddings = bert_embedder.embed([query, *_TEXTS], use_tqdm=False)
    query_vector = torch.tensor(embeddings[0].outputs.embedding)
    for score, embedding in zip(scores, embeddings[1:]):
        expected = F.cosine_similarity(query_vector, torch.tensor(embedding.outputs.embedding), dim=0).item()
        assert score.outputs.score == pytest.approx(expected, abs=1e-6)
    pairwise = bert_embedder.score(_TEXTS[:2], _TEXTS[2:], use_tqdm=False)
    assert [s.outputs.score for s in pairwise] == pytest.approx(
        [bert_embedder.score(a, [b], use_tqdm=False)[0].outputs.score for a, b in zip(_TEXTS[:2], _TEXTS[2:])],
        abs=1e-6,
    )
    with pytest.raises(ValueError, match="as many as data_2"):
        bert_embedder.score(_TEXTS[:2], _TEXTS[:3], use_tqdm=False)


@pytest.mark.slow
def test_embedding_model_refuses_to_generate_or_classify(bert_embedder: LLM) -> None:
    with pytest.raises(ValueError, match="needs a generative model"):
        bert_embedder.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="LLM.classify needs a model that can classify"):
        bert_embedder.classify(["hello"], use_tqdm=False)
    with pytest.raises(ValueError, match="activation applies to classify"):
        bert_embedder.embed(["hello"], PoolingParams(activation=True), use_tqdm=False)
    # A rejected call submits nothing: the engine still serves.
    assert len(bert_embedder.embed(["still serving"], use_tqdm=False)) == 1


@pytest.mark.slow
def test_generation_model_refuses_pooling_calls_with_a_hint(make_tiny_checkpoint) -> None:
    llm = LLM(make_tiny_checkpoint("llama"))
    try:
        for call in (llm.embed, llm.classify, llm.encode):
            with pytest.raises(ValueError, match="loaded to generate|generative model"):
                call(["hello"], use_tqdm=False)
        with pytest.raises(ValueError, match="task='embed'"):
            llm.score("a", ["b"], use_tqdm=False)
        with pytest.raises(ValueError, match="task='embed'"):
            llm.llm_engine.processor.process_inputs("x", "hello", PoolingParams())
        assert llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.slow
def test_classifier_output_types_and_embed_refusal(make_tiny_encoder) -> None:
    llm = LLM(make_tiny_encoder("BertForSequenceClassification", num_labels=3))
    try:
        outputs = llm.classify(_TEXTS, use_tqdm=False)
        assert all(isinstance(o, ClassificationRequestOutput) and o.outputs.num_classes == 3 for o in outputs)
        assert all(sum(o.outputs.probs) == pytest.approx(1.0, abs=1e-5) for o in outputs)
        with pytest.raises(ValueError, match="LLM.embed needs a model that can embed"):
            llm.embed(_TEXTS, use_tqdm=False)
        with pytest.raises(ValueError, match="cross-encoder"):
            llm.score("a", ["b"], use_tqdm=False)  # three labels: not a cross-encoder
    finally:
        llm.llm_engine.shutdown()


# ---------------------------------------------------------------- frontend pieces, no engine


@pytest.fixture(scope="module")
def pooling_processor(make_tiny_encoder) -> Processor:
    config = EngineArgs(model=make_tiny_encoder("BertForSequenceClassification", num_labels=1), max_num_batched_tokens=32).create_engine_config()
    assert config.scheduler_config.runner_type == "pooling" and not config.scheduler_config.enable_chunked_prefill
    return Processor(config.model_config, get_tokenizer(config.model_config.model), [], config.scheduler_config)


@pytest.mark.slow
def test_processor_builds_pooling_requests_that_cross_the_process_boundary(pooling_processor: Processor) -> None:
    request, text = pooling_processor.process_inputs("r1", "classify me", PoolingParams(truncate_prompt_tokens=-1))
    assert text == "classify me" and request.sampling_params is None
    assert request.pooling_params == PoolingParams(truncate_prompt_tokens=-1, task="classify", activation=True)
    pair, _ = pooling_processor.process_score_pair("r2", "query", "a document")
    tokenizer = pooling_processor.tokenizer
    encoded = tokenizer("query", "a document")
    assert pair.prompt_token_ids == encoded["input_ids"]
    assert pair.pooling_params is not None and pair.pooling_params.task == "score"
    assert pair.pooling_params.compressed_token_type_ids == encoded["token_type_ids"].index(1)
    decoded = MsgpackDecoder(EngineCoreRequest).decode(MsgpackEncoder().encode(pair))
    assert decoded == pair


@pytest.mark.slow
def test_processor_rejects_prompts_over_the_step_budget_unless_truncated(pooling_processor: Processor) -> None:
    long_text = " ".join(["token"] * 40)
    with pytest.raises(ValueError, match="max_num_batched_tokens=32"):
        pooling_processor.process_inputs("r", long_text, PoolingParams())
    request, _ = pooling_processor.process_inputs("r", long_text, PoolingParams(truncate_prompt_tokens=32))
    assert len(request.prompt_token_ids) == 32
    with pytest.raises(ValueError, match="cannot generate"):
        pooling_processor.process_inputs("r", "hi", SamplingParams())
    with pytest.raises(ValueError, match="at most max_model_len"):
        pooling_processor.process_inputs("r", "hi", PoolingParams(truncate_prompt_tokens=10_000))


def test_output_processor_delivers_one_pooling_output_per_request_to_its_queue() -> None:
    async def run() -> list[object]:
        processor = OutputProcessor(None, log_stats=True)
        queue: asyncio.Queue = asyncio.Queue()
        params = PoolingParams(task="embed", normalize=True)
        for request_id in ("done", "aborted"):
            processor.add_request(
                EngineCoreRequest(request_id, [1, 2, 3], None, None, 0.0, pooling_params=params), None, queue=queue
            )
        result = processor.process_outputs(
            [
                EngineCoreOutput("done", [], finish_reason=FinishReason.STOP, pooling_output=[0.6, 0.8]),
                EngineCoreOutput("aborted", []),  # still running: nothing to report
            ]
        )
        assert result.request_outputs == [] and [s.request_id for s in result.finished_requests] == ["done"]
        assert processor.abort_requests(["aborted"])[0] == ["aborted"]
        assert not processor.has_unfinished_requests()
        return [queue.get_nowait() for _ in range(queue.qsize())]

    done, aborted = asyncio.run(run())
    assert isinstance(done, PoolingRequestOutput) and isinstance(aborted, PoolingRequestOutput)
    assert (done.request_id, done.finished, done.finish_reason) == ("done", True, "stop")
    assert done.outputs.data.tolist() == pytest.approx([0.6, 0.8])
    assert done.prompt_token_ids == [1, 2, 3]
    assert (aborted.request_id, aborted.finish_reason, aborted.outputs.data.numel()) == ("aborted", "abort", 0)
