"""Flags of `pagedserve serve`: the server's own, then every EngineArgs flag (vLLM's names)."""

from __future__ import annotations

import argparse
import os

from pagedserve.engine.arg_utils import EngineArgs

API_KEY_ENV = "PAGEDSERVE_API_KEY"
DEFAULT_MAX_REQUEST_BODY_BYTES = 8 << 20


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="HF checkpoint directory or .gguf file to serve (default: SmolLM2-135M-Instruct); same as --model",
    )
    _add_server_args(parser)
    _add_chat_args(parser)
    _add_limit_args(parser)
    _add_logging_args(parser)
    EngineArgs.add_cli_args(parser)
    return parser


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    """Address, names, adapters and access."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="0.0.0.0", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="names clients use in the `model` field; the first is reported in responses "
        "(default: the MODEL argument)",
    )
    group.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters (PEFT directories) to serve by name over the base model; needs --enable-lora",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require `Authorization: Bearer <key>` on every route except /health, /metrics, /version and "
        f"the API docs (default: ${API_KEY_ENV})",
    )
    group.add_argument(
        "--headless",
        action="store_true",
        help="run this host's data-parallel engine cores only (no API server); they connect to the API "
        "server at --data-parallel-address (with --data-parallel-size-local and --data-parallel-start-rank)",
    )


def _add_chat_args(parser: argparse.ArgumentParser) -> None:
    """Chat templates, tool calls and reasoning."""
    group = parser.add_argument_group("chat")
    group.add_argument(
        "--chat-template",
        default=None,
        help="chat template (a Jinja file, or the template itself) replacing the tokenizer's",
    )
    group.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a `chat_template` in requests (a Jinja template runs as code on the server)",
    )
    group.add_argument(
        "--response-role", default="assistant", help="role of the generated message in chat responses"
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide to call tools (tool_choice "auto", the default with tools); needs '
        "--tool-call-parser",
    )
    group.add_argument(
        "--tool-call-parser",
        default=None,
        help="how the model writes tool calls: hermes (Qwen2.5/Qwen3, Hermes, SmolLM: <tool_call>{...}"
        "</tool_call>) or llama3_json",
    )
    group.add_argument(
        "--reasoning-parser",
        default=None,
        help="split the model's thinking into reasoning_content: deepseek_r1 or qwen3 (<think>...</think>)",
    )


def _add_limit_args(parser: argparse.ArgumentParser) -> None:
    """Per-request bounds, connection timeouts, and what happens when the engine dies."""
    group = parser.add_argument_group("limits")
    group.add_argument(
        "--max-n",
        type=int,
        default=128,
        help="most sequences a request may ask for per prompt: `n`, or `best_of` (the beam width) with "
        "use_beam_search",
    )
    group.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="most characters of prompt text in one request (all its prompts or messages), refused before "
        "tokenization (default: 16 per token of the context, at least 1,000,000)",
    )
    group.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        help="larger request bodies are refused with 413 before they are read in full (default: 8 MiB)",
    )
    group.add_argument(
        "--keep-alive-on-engine-death",
        action="store_true",
        help="keep serving (503 on every request) when the engine core dies, instead of exiting with "
        "status 1 so that a supervisor restarts the server",
    )
    group.add_argument(
        "--timeout-keep-alive", type=int, default=5, help="seconds an idle HTTP keep-alive connection stays open"
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds that in-flight requests get to finish on SIGINT/SIGTERM before they are aborted",
    )


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    """Request and stats logging."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level of uvicorn",
    )
    group.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="do not log one line per HTTP request"
    )
    group.add_argument(
        "--disable-log-requests", action="store_true", help="do not log each request's prompt size and params"
    )
    group.add_argument(
        "--disable-log-stats", action="store_true", help="do not log throughput and KV cache usage periodically"
    )
    group.add_argument(
        "--log-stats-interval", type=float, default=10.0, help="seconds between throughput log lines"
    )


def validate_parsed_serve_args(args: argparse.Namespace) -> None:
    """Resolves `MODEL` vs `--model`; raises ValueError naming the conflicting flags."""
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"MODEL {args.model_tag!r} and --model {args.model!r} disagree; give one")
        args.model = args.model_tag
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.served_model_name is not None and not all(args.served_model_name):
        raise ValueError("--served-model-name values must be non-empty")
    if getattr(args, "enable_auto_tool_choice", False) and not getattr(args, "tool_call_parser", None):
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if getattr(args, "lora_modules", None):
        from pagedserve.entrypoints.openai.serving_models import parse_lora_module

        if not getattr(args, "enable_lora", False):
            raise ValueError("--lora-modules needs --enable-lora")
        args.lora_modules = [parse_lora_module(value) for value in args.lora_modules]
    from pagedserve.entrypoints.openai.reasoning import ReasoningParserManager
    from pagedserve.entrypoints.openai.tool_parsers import ToolParserManager

    if getattr(args, "tool_call_parser", None):
        ToolParserManager.get_tool_parser(args.tool_call_parser)
    if getattr(args, "reasoning_parser", None):
        ReasoningParserManager.get_reasoning_parser(args.reasoning_parser)
    for flag in ("max_n", "max_prompt_chars", "max_request_body_bytes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def load_chat_template(chat_template: str | None) -> str | None:
    """`--chat-template`: a file's contents, or the argument itself when it is a Jinja template."""
    if chat_template is None:
        return None
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    if any(marker in chat_template for marker in ("{{", "{%")):
        return chat_template
    raise ValueError(f"--chat-template {chat_template!r} is neither a file nor a Jinja template")
