"""The server's request plumbing without a server: invalid Unicode in parsed JSON, and the field
paths that validation errors name."""

from __future__ import annotations

import json

from pagedserve.entrypoints.openai.server_utils import find_invalid_unicode, top_level_field


def test_a_lone_surrogate_is_found_with_its_path():
    body = json.loads(
        '{"model": "m", "messages": [{"role": "user", "content": "ok"}, {"content": "x\\udc00"}]}'
    )
    assert find_invalid_unicode(body) == ("messages[1].content", "\\udc00")
    assert find_invalid_unicode(json.loads('{"k\\ud800": 1}')) == ("k\ud800", "\\ud800")


def test_surrogate_pairs_and_other_text_are_valid():
    assert (
        find_invalid_unicode(
            json.loads('{"prompt": ["\\ud83d\\ude00", "plain", "世界"], "n": [1, 2.5, null]}')
        )
        is None
    )


def test_deep_nesting_does_not_recurse():
    nested: list = ["\ud800"]
    for _ in range(5000):
        nested = [nested]
    path, _ = find_invalid_unicode(nested)
    assert path == "[0]" * 5000 + "[0]"


def test_the_param_of_a_path_is_its_top_level_field():
    assert top_level_field("messages[0].content") == "messages"
    assert top_level_field("prompt") == "prompt"
    assert top_level_field("") is None
