from __future__ import annotations

import pytest

from pagedserve.core.kv_cache_utils import get_request_block_hasher, hash_block_tokens, root_block_hash
from pagedserve.core.request import Request, RequestStatus
from pagedserve.engine import EngineCoreRequest, FinishReason
from pagedserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


def _request(prompt: list[int], seed: int | None = 0, cache_salt: str | None = None) -> Request:
    return Request(
        request_id="r",
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=8),
        eos_token_id=None,
        cache_salt=cache_salt,
        block_hasher=get_request_block_hasher(BLOCK_SIZE, seed),
    )


def test_block_hashes_are_deterministic_with_a_fixed_seed() -> None:
    prompt = list(range(10))
    first, second = _request(prompt).block_hashes, _request(prompt).block_hashes
    assert len(first) == 2 and first == second
    assert all(isinstance(h, bytes) and len(h) == 32 for h in first)
    assert _request(prompt, seed=1).block_hashes[0] != first[0]


def test_unseeded_root_is_random_per_process_but_stable_within_it() -> None:
    assert root_block_hash(None) == root_block_hash(None)
    assert root_block_hash(None) != root_block_hash(0)


def test_different_salts_never_share_a_block() -> None:
    prompt = list(range(12))
    unsalted = _request(prompt).block_hashes
    a = _request(prompt, cache_salt="tenant-a").block_hashes
    b = _request(prompt, cache_salt="tenant-b").block_hashes
    assert not set(a) & set(b) and not set(a) & set(unsalted) and not set(b) & set(unsalted)


def test_one_changed_token_changes_its_block_and_every_later_one() -> None:
    prompt = list(range(16))
    base = _request(prompt).block_hashes
    changed = list(prompt)
    changed[5] = 999  # block 1
    other = _request(changed).block_hashes
    assert base[0] == other[0]
    assert all(x != y for x, y in zip(base[1:], other[1:]))


def test_hash_encoding_distinguishes_token_ids_and_extra_keys() -> None:
    root = root_block_hash(0)
    assert hash_block_tokens(root, [1, 2]) != hash_block_tokens(root, [1, 2, 0])
    assert hash_block_tokens(root, [256]) != hash_block_tokens(root, [1, 0])
    assert hash_block_tokens(root, [1], ("a",)) != hash_block_tokens(root, [1], (b"a",))
    assert hash_block_tokens(root, [1], ("ab", "c")) != hash_block_tokens(root, [1], ("a", "bc"))
    assert hash_block_tokens(root, [1], ()) == hash_block_tokens(root, [1])
    with pytest.raises(TypeError):
        hash_block_tokens(root, [1], (1.5,))  # type: ignore[arg-type]


def test_block_hashes_extend_incrementally_as_tokens_are_appended() -> None:
    request = _request(list(range(6)))
    assert len(request.block_hashes) == 1
    first = request.block_hashes[0]
    request.append_output_token_ids(100)
    assert len(request.block_hashes) == 1
    request.append_output_token_ids([101, 102])
    assert len(request.block_hashes) == 2 and request.block_hashes[0] is first
    # Same as hashing the whole sequence from scratch.
    assert request.block_hashes == _request(list(range(6)) + [100, 101, 102]).block_hashes


def test_request_token_bookkeeping() -> None:
    request = _request([1, 2, 3])
    request.append_output_token_ids([4, 5])
    assert request.all_token_ids == [1, 2, 3, 4, 5]
    assert request.output_token_ids == [4, 5]
    assert (request.num_tokens, request.num_prompt_tokens, request.num_output_tokens) == (5, 3, 2)
    assert request.max_tokens == 8 and not request.is_finished()
    request.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.is_finished() and request.get_finished_reason() == FinishReason.LENGTH


def test_request_from_engine_core_request() -> None:
    core_request = EngineCoreRequest(
        request_id="x",
        prompt_token_ids=[1, 2, 3, 4, 5],
        sampling_params=SamplingParams(stop_token_ids=[7], all_stop_token_ids=[2, 9]),
        eos_token_id=2,
        arrival_time=12.5,
        priority=3,
        cache_salt="s",
    )
    request = Request.from_engine_core_request(core_request, get_request_block_hasher(BLOCK_SIZE, 0))
    assert (request.request_id, request.arrival_time, request.priority, request.cache_salt) == (
        "x",
        12.5,
        3,
        "s",
    )
    assert len(request.block_hashes) == 1
    # EOS is checked on its own (stop_reason None); the other ids are stop tokens.
    assert request.stop_token_ids == frozenset({7, 9})
