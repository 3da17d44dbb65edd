"""BERT encoders: all-MiniLM-L6-v2 (real weights) and tiny random BERT classifiers, against
transformers on the same weights; the encoder-only workflow (no KV cache, whole prompts packed
into the token budget)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from pagedserve import LLM
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core import EngineCore
from pagedserve.engine.processor import Processor
from pagedserve.pooling_params import PoolingParams
from pagedserve.tokenizer import get_tokenizer

_WORDS = (
    "the quick brown fox jumps over a lazy dog while engineers measure latency of paged attention "
    "kernels on small machines and sentences of mixed length exercise packing without padding"
).split()


def mixed_length_sentences(count: int, seed: int = 0, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(count)]


def hf_mean_pooled(model_dir: str, texts: list[str], normalize: bool = True) -> torch.Tensor:
    """sentence-transformers' recipe: AutoModel, attention-masked mean, L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


@pytest.fixture(scope="module")
def minilm_llm(minilm_path: str) -> Iterator[LLM]:
    # A budget below max_model_len (256): packing takes many steps, and long prompts are refused.
    llm = LLM(minilm_path, max_num_batched_tokens=200)
    yield llm
    llm.llm_engine.shutdown()


@pytest.mark.slow
def test_minilm_embeds_the_model_card_sentence(minilm_llm: LLM) -> None:
    (output,) = minilm_llm.embed(["This is an example sentence"], use_tqdm=False)
    embedding = output.outputs.embedding
    assert output.outputs.hidden_size == 384
    assert embedding[:4] == pytest.approx([0.0677, 0.0635, 0.0487, 0.0793], abs=1e-3)
    assert sum(v * v for v in embedding) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_minilm_cosine_similarity_of_related_sentences(minilm_llm: LLM) -> None:
    (score,) = minilm_llm.score("A man is eating food.", ["A man is eating a piece of bread."], use_tqdm=False)
    assert score.outputs.score == pytest.approx(0.755, abs=5e-3)


@pytest.mark.slow
def test_minilm_batch_is_packed_into_one_step_without_kv_cache_and_equals_transformers(minilm_path: str) -> None:
    config = EngineArgs(model=minilm_path).create_engine_config()
    core = EngineCore(config)
    try:
        # Encoder-only: empty KV cache spec, zero blocks, no block pool, nothing allocated.
        assert config.cache_config.num_gpu_blocks == 0
        assert core.scheduler.kv_cache_manager.num_usable_blocks == 0
        runner = core.executor.worker.model_runner  # type: ignore[attr-defined]
        assert runner.kv_cache_groups == [] and runner.kv_caches == []
        assert all(layer.kv_cache is None and not layer.causal for layer in runner.attention_layers)

        sentences = mixed_length_sentences(64)
        processor = Processor(config.model_config, get_tokenizer(minilm_path), [], config.scheduler_config)
        requests = [processor.process_inputs(str(i), s, PoolingParams())[0] for i, s in enumerate(sentences)]
        for request in requests:
            core.add_request(request)
        scheduler_output = core.scheduler.schedule()
        # All 64 prompts, each whole, in one step.
        assert scheduler_output.num_scheduled_tokens == {r.request_id: len(r.prompt_token_ids) for r in requests}
        outputs = core.scheduler.update_from_output(
            scheduler_output, core.executor.execute_model(scheduler_output)
        ).outputs
        assert sorted(o.request_id for o in outputs) == sorted(r.request_id for r in requests)
        assert all(o.finished and o.new_token_ids == [] for o in outputs)
        ours = torch.tensor([o.pooling_output for o in sorted(outputs, key=lambda o: int(o.request_id))])
    finally:
        core.shutdown()

    reference = hf_mean_pooled(minilm_path, sentences)
    assert (ours - reference).abs().max().item() < 1e-5
    assert F.cosine_similarity(ours, reference, dim=-1).min().item() > 0.9999


@pytest.mark.slow
def test_encoder_prompts_are_packed_whole_up_to_the_token_budget(minilm_path: str) -> None:
    budget = 64
    config = EngineArgs(model=minilm_path, max_num_batched_tokens=budget).create_engine_config()
    assert not config.scheduler_config.enable_chunked_prefill
    core = EngineCore(config)
    try:
        processor = Processor(config.model_config, get_tokenizer(minilm_path), [], config.scheduler_config)
        requests = [
            processor.process_inputs(str(i), s, PoolingParams())[0]
            for i, s in enumerate(mixed_length_sentences(20, seed=1))
        ]
        prompt_lens = {r.request_id: len(r.prompt_token_ids) for r in requests}
        for request in requests:
            core.add_request(request)
        finished: set[str] = set()
        num_steps = 0
        while core.scheduler.has_requests():
            scheduler_output = core.scheduler.schedule()
            num_steps += 1
            assert scheduler_output.total_num_scheduled_tokens <= budget
            for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
                assert num_tokens == prompt_lens[request_id]  # never a chunk
            result = core.scheduler.update_from_output(
                scheduler_output, core.executor.execute_model(scheduler_output)
            )
            finished |= {o.request_id for o in result.outputs if o.finished and o.pooling_output}
    finally:
        core.shutdown()
    assert finished == set(prompt_lens)
    assert num_steps >= sum(prompt_lens.values()) // budget


@pytest.mark.slow
def test_a_thousand_sentences_run_through_budget_packing_in_order(minilm_llm: LLM, minilm_path: str) -> None:
    sentences = [f"{i}: " + s for i, s in enumerate(mixed_length_sentences(1000, seed=2, max_words=12))]
    outputs = minilm_llm.embed(sentences, use_tqdm=False)
    assert len(outputs) == 1000
    sample = list(range(0, 1000, 97))
    reference = hf_mean_pooled(minilm_path, [sentences[i] for i in sample])
    ours = torch.tensor([outputs[i].outputs.embedding for i in sample])
    assert (ours - reference).abs().max().item() < 1e-5


@pytest.mark.slow
def test_prompt_longer_than_the_token_budget_is_rejected_before_the_engine(minilm_llm: LLM) -> None:
    tokenizer = minilm_llm.get_tokenizer()
    text = " ".join(["word"] * 220)  # 222 tokens: within max_model_len 256, over the budget 200
    assert 200 < len(tokenizer.encode(text)) <= 256
    with pytest.raises(ValueError, match="max_num_batched_tokens=200"):
        minilm_llm.embed([text], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len=256"):
        minilm_llm.embed([" ".join(["word"] * 400)], use_tqdm=False)
    # Nothing was left behind: the engine still serves.
    assert len(minilm_llm.embed(["still alive"], use_tqdm=False)) == 1


@pytest.mark.slow
def test_truncate_prompt_tokens_keeps_the_start_and_special_tokens(minilm_llm: LLM, minilm_path: str) -> None:
    tokenizer = minilm_llm.get_tokenizer()
    text = "the embedding model reads only the beginning of this text " * 30
    (output,) = minilm_llm.embed([text], truncate_prompt_tokens=20, use_tqdm=False)
    expected_ids = tokenizer(text, truncation=True, max_length=20)["input_ids"]
    assert output.prompt_token_ids == expected_ids
    assert expected_ids[0] == tokenizer.cls_token_id and expected_ids[-1] == tokenizer.sep_token_id
    reference = hf_mean_pooled(minilm_path, [tokenizer.decode(expected_ids[1:-1])])
    assert (torch.tensor(output.outputs.embedding) - reference[0]).abs().max().item() < 1e-5


@pytest.mark.slow
def test_dimensions_and_normalize_params_follow_the_unnormalised_mean(minilm_llm: LLM, minilm_path: str) -> None:
    texts = ["Matryoshka embeddings keep their first dimensions", "short"]
    raw = minilm_llm.embed(texts, PoolingParams(normalize=False), use_tqdm=False)
    cut = minilm_llm.embed(texts, PoolingParams(dimensions=64), use_tqdm=False)
    reference = hf_mean_pooled(minilm_path, texts, normalize=False)
    for raw_output, cut_output, expected in zip(raw, cut, reference):
        assert (torch.tensor(raw_output.outputs.embedding) - expected).abs().max().item() < 1e-5
        assert cut_output.outputs.hidden_size == 64
        expected_cut = F.normalize(expected[:64], dim=0)
        assert (torch.tensor(cut_output.outputs.embedding) - expected_cut).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="dimensions"):
        minilm_llm.embed(texts, PoolingParams(dimensions=385), use_tqdm=False)


# ---------------------------------------------------------------- tiny random BERT classifiers


def hf_logits(model_dir: str, texts: list[str] | list[tuple[str, str]]) -> torch.Tensor:
    """transformers' logits, one input at a time (no padding)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            inputs = tokenizer(*text, return_tensors="pt") if isinstance(text, tuple) else tokenizer(text, return_tensors="pt")
            rows.append(model(**inputs).logits[0])
    return torch.stack(rows)


_TEXTS = [
    "a short one",
    "a considerably longer input sentence that spans many more word pieces than the others do",
    "x",
    "classifiers read the first token after attending to everything",
]


@pytest.mark.slow
def test_tiny_bert_classifier_probabilities_and_logits_equal_transformers(make_tiny_encoder) -> None:
    model_dir = make_tiny_encoder("BertForSequenceClassification", num_labels=3)
    llm = LLM(model_dir)
    try:
        probs = torch.tensor([o.outputs.probs for o in llm.classify(_TEXTS, use_tqdm=False)])
        logits = torch.tensor(
            [o.outputs.probs for o in llm.classify(_TEXTS, PoolingParams(activation=False), use_tqdm=False)]
        )
    finally:
        llm.llm_engine.shutdown()
    reference = hf_logits(model_dir, _TEXTS)
    assert (logits - reference).abs().max().item() < 1e-5
    assert (probs - reference.softmax(-1)).abs().max().item() < 1e-5
    # Not a degenerate model: the texts get different distributions.
    assert (reference.softmax(-1) - reference.softmax(-1)[0]).abs().max().item() > 1e-3


@pytest.mark.slow
def test_tiny_bert_cross_encoder_scores_pairs_with_token_types_like_transformers(make_tiny_encoder) -> None:
    model_dir = make_tiny_encoder("BertForSequenceClassification", num_labels=1)
    query = "what do cross encoders read"
    llm = LLM(model_dir)
    try:
        scores = llm.score(query, _TEXTS, use_tqdm=False)
        swapped = llm.score(_TEXTS, [query] * len(_TEXTS), use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    reference = torch.sigmoid(hf_logits(model_dir, [(query, t) for t in _TEXTS]))[:, 0]
    ours = torch.tensor([s.outputs.score for s in scores])
    assert (ours - reference).abs().max().item() < 1e-5
    swapped_reference = torch.sigmoid(hf_logits(model_dir, [(t, query) for t in _TEXTS]))[:, 0]
    assert (torch.tensor([s.outputs.score for s in swapped]) - swapped_reference).abs().max().item() < 1e-5
    # The pair is one sequence: [CLS] query [SEP] text [SEP].
    tokenizer = get_tokenizer(model_dir)
    assert scores[0].prompt_token_ids == tokenizer(query, _TEXTS[0])["input_ids"]
