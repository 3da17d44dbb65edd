"""Beam search scoring and beam selection (no model: logprobs are given by hand)."""

from __future__ import annotations

import math

import pytest

from pagedserve import BeamSearchParams
from pagedserve.beam_search import (
    BeamSearchInstance,
    BeamSearchSequence,
    create_sort_beams_key_function,
    get_beam_search_score,
)
from pagedserve.outputs import Logprob

EOS = 2
PROMPT = [100, 101, 102]


def _top(**logprobs: float) -> dict[int, Logprob]:
    """_top(t5=-0.1, t7=-1.0) -> {5: Logprob(-0.1, rank 1), 7: Logprob(-1.0, rank 2)}."""
    ordered = sorted(logprobs.items(), key=lambda item: -item[1])
    return {int(name[1:]): Logprob(value, rank) for rank, (name, value) in enumerate(ordered, start=1)}


def _outputs(instance: BeamSearchInstance) -> list[list[int]]:
    return [beam.output_token_ids for beam in instance.completed]


def test_score_divides_by_generated_length_counting_a_final_eos() -> None:
    # transformers divides by the generated length with the EOS included.
    assert get_beam_search_score([5, 6, EOS], -3.0, None, 1.0) == pytest.approx(-1.0)
    assert get_beam_search_score([5, 6, 7, 8], -3.0, None, 2.0) == pytest.approx(-3.0 / 16)
    assert get_beam_search_score([5, 6, 7], -3.0, None, 0.0) == pytest.approx(-3.0)
    assert get_beam_search_score([5, 6, 7, 8], -3.0, None, -1.0) == pytest.approx(-12.0)


def test_score_with_eos_token_id_leaves_a_final_eos_uncounted() -> None:
    assert get_beam_search_score([5, 6, EOS], -3.0, EOS, 1.0) == pytest.approx(-1.5)
    assert get_beam_search_score([5, EOS, 6], -3.0, EOS, 1.0) == pytest.approx(-1.0)
    assert get_beam_search_score([], 0.0, EOS, 1.0) == 0.0
    assert get_beam_search_score([EOS], -1.0, EOS, 1.0) == pytest.approx(-1.0)


def test_sort_key_scores_only_the_generated_tokens() -> None:
    short = BeamSearchSequence(PROMPT + [5], [{}], cum_logprob=-1.2, num_prompt_tokens=3)
    long = BeamSearchSequence(PROMPT + [5, 6, 7], [{}] * 3, cum_logprob=-3.0, num_prompt_tokens=3)
    key = create_sort_beams_key_function(None, 1.0)
    assert key(short) == pytest.approx(-1.2) and key(long) == pytest.approx(-1.0)
    assert sorted([short, long], key=key, reverse=True) == [long, short]
    # Without the length normalisation the shorter beam wins.
    assert sorted([short, long], key=create_sort_beams_key_function(None, 0.0), reverse=True) == [short, long]


def test_beam_search_params_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearchParams(beam_width=2, max_tokens=4, early_stopping="sometimes")  # type: ignore[arg-type]
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    assert (params.temperature, params.length_penalty, params.ignore_eos, params.early_stopping) == (
        0.0,
        1.0,
        False,
        False,
    )


def test_instance_asks_for_one_beam_width_of_candidates_per_eos_id_plus_one() -> None:
    params = BeamSearchParams(beam_width=3, max_tokens=4)
    assert BeamSearchInstance(PROMPT, params, [EOS]).num_logprobs == 6
    assert BeamSearchInstance(PROMPT, params, [EOS, 7, 8]).num_logprobs == 12
    ignoring = BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True)
    assert BeamSearchInstance(PROMPT, ignoring, [EOS, 7, 8]).num_logprobs == 6


def test_next_beams_are_the_best_cumulative_logprobs_across_all_beams() -> None:
    instance = BeamSearchInstance(PROMPT, BeamSearchParams(beam_width=2, max_tokens=5), [EOS])
    instance.advance([_top(t10=-0.5, t11=-1.0, t12=-3.0, t13=-4.0)])
    assert [b.output_token_ids for b in instance.beams] == [[10], [11]]
    # Beam [10]'s second continuation (-0.5 - 0.3) beats beam [11]'s best (-1.0 - 0.2).
    instance.advance(
        [_top(t20=-0.2, t21=-0.3, t22=-5.0, t23=-6.0), _top(t30=-0.2, t31=-2.0, t32=-5.0, t33=-6.0)]
    )
    assert [b.output_token_ids for b in instance.beams] == [[10, 20], [10, 21]]
    assert [b.cum_logprob for b in instance.beams] == pytest.approx([-0.7, -0.8])
    assert instance.beams[0].tokens == PROMPT + [10, 20] and len(instance.beams[0].logprobs) == 2
    assert not instance.completed and not instance.finished


def test_eos_completes_a_beam_only_among_the_best_beam_width_candidates() -> None:
    instance = BeamSearchInstance(
        PROMPT, BeamSearchParams(beam_width=2, max_tokens=5, length_penalty=0.0), [EOS]
    )
    instance.advance([_top(t10=-0.1, t2=-0.5, t11=-1.0, t12=-1.5)])
    # EOS ranked 2nd: completed; the live beams are the best two others.
    assert _outputs(instance) == [[EOS]] and instance.completed[0].finish_reason == "stop"
    assert [b.output_token_ids for b in instance.beams] == [[10], [11]]
    # EOS ranked 3rd (below beam_width): dropped, neither live nor completed.
    instance.advance(
        [_top(t20=-0.1, t21=-0.2, t2=-0.3, t22=-3.0), _top(t30=-2.0, t31=-3.0, t2=-4.0, t32=-5.0)]
    )
    assert _outputs(instance) == [[EOS]]
    assert [b.output_token_ids for b in instance.beams] == [[10, 20], [10, 21]]


def test_ignore_eos_extends_beams_through_eos() -> None:
    params = BeamSearchParams(beam_width=2, max_tokens=2, ignore_eos=True)
    instance = BeamSearchInstance(PROMPT, params, [EOS])
    instance.advance([_top(t2=-0.1, t10=-0.5, t11=-1.0, t12=-1.5)])
    assert [b.output_token_ids for b in instance.beams] == [[EOS], [10]] and not instance.completed
    instance.advance(
        [_top(t20=-0.1, t21=-0.2, t22=-3.0, t23=-4.0), _top(t30=-0.1, t31=-3.0, t32=-4.0, t33=-5.0)]
    )
    assert instance.finished and _outputs(instance) == [[EOS, 20], [EOS, 21]]
    assert all(beam.finish_reason == "length" for beam in instance.completed)


def test_max_tokens_completes_the_best_beam_width_candidates_sorted_by_score() -> None:
    instance = BeamSearchInstance(PROMPT, BeamSearchParams(beam_width=2, max_tokens=2), [EOS])
    instance.advance([_top(t10=-0.5, t11=-0.6, t12=-3.0, t13=-4.0)])
    instance.advance(
        [_top(t20=-1.0, t21=-1.1, t22=-5.0, t23=-6.0), _top(t30=-0.1, t31=-2.0, t32=-5.0, t33=-6.0)]
    )
    assert instance.finished and not instance.beams
    assert _outputs(instance) == [[11, 30], [10, 20]]
    assert [b.finish_reason for b in instance.completed] == ["length", "length"]
    with pytest.raises(RuntimeError, match="finished"):
        instance.advance([])


def _two_eos_then_live_beam(early_stopping: bool | str, length_penalty: float) -> BeamSearchInstance:
    """Step 1 completes [EOS] (-1.0); step 2 completes [10, EOS] (-1.5 in all) and leaves live
    beams whose best has cumulative logprob -1.8 after two tokens."""
    params = BeamSearchParams(
        beam_width=2, max_tokens=10, early_stopping=early_stopping, length_penalty=length_penalty
    )
    instance = BeamSearchInstance(PROMPT, params, [EOS])
    instance.advance([_top(t10=-0.5, t2=-1.0, t11=-1.2, t12=-3.0)])
    assert not instance.finished
    instance.advance(
        [_top(t2=-1.0, t20=-1.3, t21=-1.4, t22=-5.0), _top(t30=-2.0, t31=-3.0, t2=-4.0, t32=-5.0)]
    )
    assert sorted(_outputs(instance)) == [[EOS], [10, EOS]]
    return instance


def test_early_stopping_false_stops_when_no_live_beam_can_beat_the_completed_ones() -> None:
    # length_penalty 1: completed -1.0 ([EOS]) and -0.75 ([10, EOS]); the live best, -1.8 / 2,
    # still beats -1.0, so the search goes on.
    assert not _two_eos_then_live_beam(False, 1.0).finished
    # With length_penalty 0: completed -1.0 and -1.5; live best -1.8 cannot beat -1.5.
    assert _two_eos_then_live_beam(False, 0.0).finished


def test_early_stopping_true_stops_once_beam_width_beams_completed() -> None:
    assert _two_eos_then_live_beam(True, 1.0).finished


def test_early_stopping_never_assumes_the_live_beam_reaches_max_tokens() -> None:
    # length_penalty 1: best possible live score -1.8 / 10 beats every completed one.
    instance = _two_eos_then_live_beam("never", 1.0)
    assert not instance.finished
    # length_penalty 0: the same test as early_stopping=False.
    assert _two_eos_then_live_beam("never", 0.0).finished
    assert math.isclose(instance.beams[0].cum_logprob, -1.8)
