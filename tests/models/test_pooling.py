"""Pooling: poolers and params without a model, the no-KV-cache scheduler path, and pooling
models (XLM-R, decoders as last-token embedders) against transformers on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pagedserve import LLM
from pagedserve.config.cache import CacheConfig
from pagedserve.config.model import ModelConfig, PoolerConfig, _sentence_transformers_pooler_config
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.core.kv_cache_coordinator import KVCacheCoordinatorNoKV
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core import EngineCore
from pagedserve.models.layers.pooler import (
    ClassifierPooler,
    LastPool,
    Pooler,
    PoolingMetadata,
    PoolingMethod,
)
from pagedserve.pooling_params import PoolingParams
from pagedserve.worker.outputs import ModelRunnerOutput


def _metadata(lengths: list[int], rows: list[int] | None = None, **params: object) -> PoolingMetadata:
    """Metadata of a step holding whole prompts of `lengths`; pooled: `rows` (default all)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = list(range(len(lengths))) if rows is None else rows
    return PoolingMetadata(
        token_starts=torch.tensor(starts[rows]),
        token_ends=torch.tensor(starts[rows] + np.array(lengths)[rows]),
        num_computed_tokens=torch.zeros(len(rows), dtype=torch.long),
        prompt_lens=torch.tensor(np.array(lengths)[rows]),
        pooling_params=[PoolingParams(**params) for _ in rows],  # type: ignore[arg-type]
    )


def test_cls_mean_and_last_pooling_equal_per_request_slices() -> None:
    lengths = [3, 1, 5, 2]
    hidden = torch.randn(sum(lengths), 6)
    segments = hidden.split(lengths)
    metadata = _metadata(lengths)
    pooled = {t: PoolingMethod.from_pooling_type(t)(hidden, metadata) for t in ("CLS", "MEAN", "LAST")}
    torch.testing.assert_close(pooled["CLS"], torch.stack([s[0] for s in segments]))
    torch.testing.assert_close(pooled["LAST"], torch.stack([s[-1] for s in segments]))
    torch.testing.assert_close(pooled["MEAN"], torch.stack([s.mean(0) for s in segments]))


def test_mean_pooling_of_some_requests_reads_only_their_tokens() -> None:
    lengths = [3, 4, 2]
    hidden = torch.randn(sum(lengths), 5)
    segments = hidden.split(lengths)
    pooled = PoolingMethod.from_pooling_type("MEAN")(hidden, _metadata(lengths, rows=[0, 2]))
    torch.testing.assert_close(pooled, torch.stack([segments[0].mean(0), segments[2].mean(0)]))


def test_cls_and_mean_pooling_refuse_a_prompt_split_over_steps() -> None:
    metadata = _metadata([4])
    metadata.num_computed_tokens = torch.tensor([2])
    metadata.token_ends = torch.tensor([2])
    for pooling_type in ("CLS", "MEAN"):
        with pytest.raises(RuntimeError, match="whole in one step"):
            PoolingMethod.from_pooling_type(pooling_type)(torch.randn(2, 3), metadata)
    # LAST pooling only needs the prompt's last token, so chunked prefill is fine for it.
    assert LastPool()(torch.randn(2, 3), metadata).shape == (1, 3)


def test_embedding_pooler_truncates_dimensions_then_normalises_per_request() -> None:
    hidden = torch.randn(5, 8)
    metadata = _metadata([2, 3])
    metadata.pooling_params = [
        PoolingParams(task="embed", normalize=True, dimensions=3),
        PoolingParams(task="embed", normalize=False),
    ]
    first, second = Pooler.for_embed(PoolerConfig("LAST"))(hidden, metadata)
    torch.testing.assert_close(first, F.normalize(hidden[1, :3], dim=0))
    torch.testing.assert_close(second, hidden[4])


def test_classifier_pooler_applies_softmax_or_sigmoid_only_where_asked() -> None:
    from types import SimpleNamespace

    hidden = torch.randn(4, 3)
    weight = torch.randn(2, 3)
    metadata = _metadata([1, 3])
    metadata.pooling_params = [PoolingParams(task="classify", activation=True), PoolingParams(task="classify", activation=False)]
    pooler = Pooler.for_classify(PoolerConfig("CLS"), lambda x: x @ weight.T, SimpleNamespace(num_labels=2))
    assert isinstance(pooler, ClassifierPooler)
    probs, logits = pooler(hidden, metadata)
    torch.testing.assert_close(probs, (hidden[0] @ weight.T).softmax(-1))
    torch.testing.assert_close(logits, hidden[1] @ weight.T)
    one_label = Pooler.for_classify(PoolerConfig("CLS"), lambda x: x @ weight[:1].T, SimpleNamespace(id2label={0: "s"}))
    score, _ = one_label(hidden, metadata)
    torch.testing.assert_close(score, torch.sigmoid(hidden[0] @ weight[:1].T))


def test_pooling_params_take_task_defaults_and_reject_options_of_other_tasks() -> None:
    embed = PoolingParams()
    embed.verify("embed", embedding_size=16, default_normalize=False)
    assert (embed.task, embed.normalize, embed.activation) == ("embed", False, None)
    classify = PoolingParams()
    classify.verify("classify")
    assert (classify.task, classify.activation) == ("classify", True)
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=17).verify("embed", embedding_size=16)
    with pytest.raises(ValueError, match="apply to embed"):
        PoolingParams(dimensions=4).verify("classify")
    with pytest.raises(ValueError, match="activation"):
        PoolingParams(activation=True).verify("embed")
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="task"):
        PoolingParams(task="generate")  # type: ignore[arg-type]


def test_sentence_transformers_files_choose_pooling_and_normalisation(tmp_path: Path) -> None:
    assert _sentence_transformers_pooler_config(str(tmp_path)) is None

    def write(modules: list[dict[str, str]], pooling: dict[str, bool]) -> PoolerConfig | None:
        (tmp_path / "modules.json").write_text(json.dumps(modules))
        (tmp_path / "1_Pooling").mkdir(exist_ok=True)
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
        return _sentence_transformers_pooler_config(str(tmp_path))

    transformer = {"path": "", "type": "sentence_transformers.models.Transformer"}
    pooling = {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    normalize = {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    assert write([transformer, pooling, normalize], {"pooling_mode_mean_tokens": True}) == PoolerConfig("MEAN", True)
    assert write([transformer, pooling], {"pooling_mode_lasttoken": True}) == PoolerConfig("LAST", False)
    assert write([transformer, pooling], {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": False}) == PoolerConfig("CLS", False)
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        write([transformer, pooling], {"pooling_mode_max_tokens": True})


def _pooling_request(request_id: str, num_tokens: int) -> Request:
    return Request(request_id, list(range(1, num_tokens + 1)), None, None, pooling_params=PoolingParams(task="embed"))


def test_kv_cache_manager_without_blocks_has_no_block_pool() -> None:
    manager = KVCacheManager(num_blocks=0, block_size=16)
    assert isinstance(manager.coordinator, KVCacheCoordinatorNoKV) and not manager.enable_caching
    assert manager.num_usable_blocks == 0 and manager.num_free_blocks == 0
    with pytest.raises(AttributeError, match="no block pool"):
        _ = manager.block_pool
    request = _pooling_request("a", 40)
    assert manager.num_blocks_for_tokens(40) == 0
    assert manager.get_computed_blocks(request)[1] == 0
    assert manager.allocate_slots(request, 40) is not None
    assert manager.get_block_ids("a") == ([],)
    assert manager.usage == 0.0
    manager.free(request)


def test_scheduler_without_kv_cache_packs_whole_pooling_prompts_and_finishes_them() -> None:
    cache_config = CacheConfig(enable_prefix_caching=False)
    cache_config.num_gpu_blocks = 0  # as EngineCore sets it for a model without KV cache
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=10,
            max_model_len=64,
            enable_chunked_prefill=False,
            runner_type="pooling",
        ),
        cache_config,
    )
    for request_id, num_tokens in (("a", 4), ("b", 5), ("c", 6), ("d", 1)):
        scheduler.add_request(_pooling_request(request_id, num_tokens))
    steps: list[dict[str, int]] = []
    finished: dict[str, EngineCoreOutput] = {}
    while scheduler.has_unfinished_requests():
        scheduler_output = scheduler.schedule()
        steps.append(dict(scheduler_output.num_scheduled_tokens))
        assert all(new.pooling_params is not None for new in scheduler_output.scheduled_new_reqs)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        runner_output = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[] for _ in req_ids],
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output={r: np.array([float(len(r))], dtype=np.float32) for r in req_ids},
        )
        for output in scheduler.update_from_output(scheduler_output, runner_output).outputs:
            finished[output.request_id] = output
    # Whole prompts only, FCFS, never past the budget: "c" waits for a step with room.
    assert steps == [{"a": 4, "b": 5}, {"c": 6, "d": 1}]
    assert {r: (o.finish_reason, o.pooling_output) for r, o in finished.items()} == {
        r: (FinishReason.STOP, [1.0]) for r in "abcd"
    }


@pytest.mark.slow
def test_task_resolution_follows_the_architecture_and_rejects_mismatches(make_tiny_checkpoint, make_tiny_encoder) -> None:
    llama = make_tiny_checkpoint("llama")
    assert ModelConfig(llama).task == "generate"
    embedder = ModelConfig(llama, task="embed")
    assert (embedder.runner_type, embedder.pooling_tasks, embedder.is_encoder_only) == ("pooling", ("embed",), False)
    assert embedder.pooler_config == PoolerConfig("LAST", True)
    with pytest.raises(ValueError, match="no classifier head"):
        ModelConfig(llama, task="classify")
    classifier = make_tiny_encoder("BertForSequenceClassification", num_labels=3)
    config = ModelConfig(classifier)
    assert (config.task, config.is_encoder_only, config.is_cross_encoder) == ("classify", True, False)
    with pytest.raises(ValueError, match="cannot generate"):
        ModelConfig(classifier, task="generate")
    with pytest.raises(ValueError, match="one label"):
        ModelConfig(classifier, task="score")
    with pytest.raises(ValueError, match="not 'embed'"):
        ModelConfig(classifier, task="embed")
    xlmr = ModelConfig(make_tiny_encoder("XLMRobertaModel"))
    # 130 position rows, the first pad_token_id + 1 = 2 never used.
    assert (xlmr.task, xlmr.max_model_len, xlmr.pooler_config) == ("embed", 128, PoolerConfig("CLS", True))


# ---------------------------------------------------------------- models against transformers

_TEXTS = [
    "hello world",
    "a much longer sentence with many more word pieces in it than the first one has",
    "x",
    "bidirectional attention sees the whole prompt",
]


def _hf_encoder_outputs(model_dir: str, auto_class: str, texts: list[str] | list[tuple[str, str]]) -> torch.Tensor:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            inputs = tokenizer(*text, return_tensors="pt") if isinstance(text, tuple) else tokenizer(text, return_tensors="pt")
            if model.config.type_vocab_size == 1:
                # The WordPiece tokenizer marks the second text with type 1; XLM-R has one type.
                inputs.pop("token_type_ids", None)
            out = model(**inputs)
            rows.append(out.logits[0] if hasattr(out, "logits") else out.last_hidden_state[0, 0])
    return torch.stack(rows)


@pytest.mark.slow
def test_tiny_xlm_roberta_embeddings_equal_transformers_cls_pooling(make_tiny_encoder) -> None:
    model_dir = make_tiny_encoder("XLMRobertaModel")
    llm = LLM(model_dir)
    try:
        ours = torch.tensor([o.outputs.embedding for o in llm.embed(_TEXTS, use_tqdm=False)])
    finally:
        llm.llm_engine.shutdown()
    reference = F.normalize(_hf_encoder_outputs(model_dir, "AutoModel", _TEXTS), dim=-1)
    assert (ours - reference).abs().max().item() < 1e-5


@pytest.mark.slow
def test_tiny_xlm_roberta_classifier_and_reranker_equal_transformers(make_tiny_encoder) -> None:
    classifier_dir = make_tiny_encoder("XLMRobertaForSequenceClassification", num_labels=4)
    reranker_dir = make_tiny_encoder("XLMRobertaForSequenceClassification", num_labels=1)
    classifier = LLM(classifier_dir)
    try:
        probs = torch.tensor([o.outputs.probs for o in classifier.classify(_TEXTS, use_tqdm=False)])
    finally:
        classifier.llm_engine.shutdown()
    logits = _hf_encoder_outputs(classifier_dir, "AutoModelForSequenceClassification", _TEXTS)
    assert (probs - logits.softmax(-1)).abs().max().item() < 1e-5

    query = "which document answers the query"
    reranker = LLM(reranker_dir)
    try:
        scores = torch.tensor([o.outputs.score for o in reranker.score(query, _TEXTS, use_tqdm=False)])
    finally:
        reranker.llm_engine.shutdown()
    pair_logits = _hf_encoder_outputs(reranker_dir, "AutoModelForSequenceClassification", [(query, t) for t in _TEXTS])
    assert (scores - torch.sigmoid(pair_logits[:, 0])).abs().max().item() < 1e-5


def _hf_last_token_states(model_dir: str, prompts: list[list[int]]) -> torch.Tensor:
    """The final hidden state (after the model's final norm) of each prompt's last token."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(torch.tensor([ids])).last_hidden_state[0, -1] for ids in prompts])


def _prompts(num_prompts: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, int(rng.integers(1, 48))).tolist() for _ in range(num_prompts)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_decoder_as_embedder_pools_the_last_token_like_transformers(make_tiny_checkpoint, kind: str) -> None:
    model_dir = make_tiny_checkpoint(kind)
    llm = LLM(model_dir, task="embed")
    try:
        prompts = _prompts(6, llm.llm_engine.config.model_config.vocab_size)
        outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        raw = llm.embed([{"prompt_token_ids": p} for p in prompts], PoolingParams(normalize=False), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    reference = _hf_last_token_states(model_dir, prompts)
    # Two float32 implementations (other GEMM kernels and summation orders, other prefill/decode
    # splits) agree to ~1e-6 here on one machine; CI once saw 2e-4 on another (values up to ~3),
    # so the bound is 1e-3: a wrong token, position or pooling moves these by O(1).
    assert (torch.tensor([o.outputs.embedding for o in raw]) - reference).abs().max().item() < 1e-3
    ours = torch.tensor([o.outputs.embedding for o in outputs])
    assert (ours - F.normalize(reference, dim=-1)).abs().max().item() < 2e-4


def _run_to_completion(core: EngineCore, requests: list[EngineCoreRequest]) -> tuple[dict[str, EngineCoreOutput], int]:
    for request in requests:
        core.add_request(request)
    finished: dict[str, EngineCoreOutput] = {}
    num_steps = 0
    while core.has_unfinished_requests():
        num_steps += 1
        for output in core.step().outputs:
            assert output.new_token_ids == []
            if output.finished:
                finished[output.request_id] = output
    return finished, num_steps


@pytest.mark.slow
def test_decoder_embedder_keeps_kv_cache_chunked_prefill_and_prefix_caching(make_tiny_checkpoint) -> None:
    model_dir = make_tiny_checkpoint("llama")
    config = EngineArgs(model=model_dir, task="embed", max_num_batched_tokens=16, block_size=4).create_engine_config()
    assert config.scheduler_config.enable_chunked_prefill and config.cache_config.enable_prefix_caching
    core = EngineCore(config)
    try:
        assert config.cache_config.num_gpu_blocks and core.scheduler.kv_cache_manager.num_usable_blocks > 0
        prompt = _prompts(1, config.model_config.vocab_size, seed=3)[0] + list(range(7, 47))  # > 16 tokens

        def request(request_id: str) -> EngineCoreRequest:
            params = PoolingParams()
            params.verify("embed")
            return EngineCoreRequest(request_id, prompt, None, None, 0.0, pooling_params=params)

        first, num_steps = _run_to_completion(core, [request("a")])
        assert num_steps >= len(prompt) // 16  # chunked over several steps
        second, _ = _run_to_completion(core, [request("b")])
    finally:
        core.shutdown()
    # Every full block but the one holding the last token comes from the prefix cache.
    assert first["a"].num_cached_tokens == 0
    assert second["b"].num_cached_tokens == 4 * ((len(prompt) - 1) // 4)
    reference = F.normalize(_hf_last_token_states(model_dir, [prompt])[0], dim=0)
    for output in (first["a"], second["b"]):
        assert output.finish_reason == FinishReason.STOP
        assert (torch.tensor(output.pooling_output) - reference).abs().max().item() < 1e-5
