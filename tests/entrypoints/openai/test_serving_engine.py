"""Helpers of the serving layer: merging engine streams, and the `pagedserve serve` flags."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncGenerator

import pytest

from pagedserve.entrypoints.cli import main
from pagedserve.entrypoints.openai.cli_args import (
    API_KEY_ENV,
    load_chat_template,
    make_arg_parser,
    validate_parsed_serve_args,
)
from pagedserve.entrypoints.openai.serving_engine import merge_async_iterators


class _Source:
    """An async generator that records how it ended (finished, cancelled or closed)."""

    def __init__(self, items: list[int], delay_s: float, fail_after: int | None = None) -> None:
        self.items = items
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.ended_by: str | None = None

    async def stream(self) -> AsyncGenerator[int, None]:
        try:
            for i, item in enumerate(self.items):
                if self.fail_after is not None and i == self.fail_after:
                    raise ValueError("source failed")
                await asyncio.sleep(self.delay_s)
                yield item
            self.ended_by = "finished"
        except asyncio.CancelledError:
            self.ended_by = "cancelled"
            raise
        except GeneratorExit:
            self.ended_by = "closed"
            raise


def test_merge_yields_every_item_tagged_with_its_source():
    async def run() -> list[tuple[int, int]]:
        fast, slow = _Source([1, 2, 3], 0.001), _Source([10, 20], 0.005)
        return [item async for item in merge_async_iterators(fast.stream(), slow.stream())]

    merged = asyncio.run(run())
    assert sorted(merged) == [(0, 1), (0, 2), (0, 3), (1, 10), (1, 20)]
    assert [v for i, v in merged if i == 0] == [1, 2, 3]


def test_closing_the_merged_stream_cancels_every_source():
    # What a client disconnect does to the engine generators of its request.
    async def run() -> list[_Source]:
        sources = [_Source(list(range(1000)), 0.01) for _ in range(3)]
        merged = merge_async_iterators(*(s.stream() for s in sources))
        await anext(merged)
        await merged.aclose()
        await asyncio.sleep(0.05)  # the source tasks run their cancellation
        return sources

    sources = asyncio.run(run())
    assert [s.ended_by for s in sources] == ["cancelled"] * 3


def test_cancelling_the_consumer_task_cancels_every_source():
    async def run() -> list[_Source]:
        sources = [_Source(list(range(1000)), 0.01) for _ in range(2)]

        async def consume() -> None:
            async for _ in merge_async_iterators(*(s.stream() for s in sources)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        return sources

    assert [s.ended_by for s in asyncio.run(run())] == ["cancelled", "cancelled"]


def test_a_failing_source_raises_and_cancels_the_others():
    async def run() -> tuple[_Source, _Source]:
        failing, other = _Source([1, 2, 3], 0.001, fail_after=1), _Source(list(range(1000)), 0.01)
        with pytest.raises(ValueError, match="source failed"):
            async for _ in merge_async_iterators(failing.stream(), other.stream()):
                pass
        await asyncio.sleep(0.05)
        return failing, other

    _, other = asyncio.run(run())
    assert other.ended_by == "cancelled"


ISSUE_FLAGS = [
    "--host", "--port", "--served-model-name", "--api-key", "--max-model-len", "--max-num-seqs",
    "--max-num-batched-tokens", "--tensor-parallel-size", "--enable-prefix-caching", "--no-enable-prefix-caching",
    "--kv-cache-memory", "--chat-template", "--dtype", "--seed", "--uvicorn-log-level", "--disable-log-requests",
]  # fmt: skip


def test_serve_help_documents_every_flag_of_the_issue(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ISSUE_FLAGS:
        assert flag in help_text, flag


def _parse(argv: list[str]) -> argparse.Namespace:
    args = make_arg_parser(argparse.ArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def test_model_argument_and_flags_parse(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = _parse(["/m", "--served-model-name", "a", "b", "--port", "9000", "--no-enable-prefix-caching"])
    assert args.model == "/m" and args.served_model_name == ["a", "b"] and args.port == 9000
    assert args.enable_prefix_caching is False
    assert args.api_key == "from-env"
    assert _parse(["--model", "/m"]).model == "/m"
    assert _parse([]).model is None  # the default model
    with pytest.raises(ValueError, match="disagree"):
        _parse(["/m", "--model", "/other"])


def test_chat_template_from_a_file_or_inline(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_chat_template(str(path)) == path.read_text()
    assert load_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template("/no/such/file.jinja")
