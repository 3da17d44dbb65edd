"""Tokenizers for HF checkpoint directories and GGUF files."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import transformers
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["get_eos_token_ids", "get_tokenizer"]

# End-of-turn tokens that an HF checkpoint's generation_config.json lists as eos but that a GGUF
# (which has no generation config) drops, by GGUF architecture.
_GGUF_END_OF_TURN_TOKENS: dict[str, tuple[str, ...]] = {
    "gemma3": ("<end_of_turn>",),
}


def get_tokenizer(
    model: str, tokenizer: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of `tokenizer` (default: `model`): an HF checkpoint directory or a .gguf file."""
    path = tokenizer or model
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist")
        tok = _gguf_tokenizer(path)
    elif not os.path.isdir(path):
        raise ValueError(
            f"tokenizer {path!r} is neither a checkpoint directory nor a .gguf file "
            "(there is no model hub here: pass a local path)"
        )
    else:
        tok = _from_directory(path, trust_remote_code)
    _drop_construction_copies(tok)
    return tok


# Attributes in which transformers 5's BPE tokenizer classes (Qwen2Tokenizer, LlamaTokenizer,
# GemmaTokenizer, ...) keep the Python vocabulary dict and merges list they built the Rust
# tokenizer from. Nothing reads them after __init__: encoding, decoding, get_vocab() and
# save_pretrained() all go through the Rust tokenizer.
_CONSTRUCTION_COPIES = ("_vocab", "_merges")


def _drop_construction_copies(tok: PreTrainedTokenizerBase) -> None:
    """Free the tokenizer's Python copies of its vocabulary and merges, and hand the freed heap
    back to the OS. On Qwen2.5's 151k vocabulary the copies are ~50 MB of Python objects, and the
    API server's resident memory went from 249 to 181 MB."""
    for name in _CONSTRUCTION_COPIES:
        value = getattr(tok, name, None)
        if isinstance(value, (dict, list)):
            setattr(tok, name, type(value)())
    gc.collect()  # the load leaves reference cycles holding parsed JSON; trim after they go
    _trim_heap()


def _trim_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS (a no-op elsewhere)."""
    # The process's own symbols (CDLL(None)): find_library would run ldconfig in a subprocess.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:  # not glibc (musl, macOS): nothing to trim
        trim(0)


def _from_directory(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer class tokenizer_config.json names, loaded directly; AutoTokenizer otherwise.

    NOTE: transformers' AutoTokenizer module imports torch (~200 MB resident, ~1 s), which the API
    server process otherwise never needs; the tokenizer classes themselves do not.
    """
    config = os.path.join(path, "tokenizer_config.json")
    name = None
    if os.path.isfile(config) and not trust_remote_code:
        with open(config) as f:
            name = json.load(f).get("tokenizer_class")
    tokenizer_class = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if tokenizer_class is None or not isinstance(tokenizer_class, type):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return tokenizer_class.from_pretrained(path)


def _gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer, converted by transformers once and then loaded from a copy saved in
    the cache directory (Qwen2.5's 151k-token vocabulary: ~5 s to convert, ~0.3 s to load)."""
    from pagedserve.models.loader.gguf import open_gguf

    meta = open_gguf(path).metadata
    saved = _saved_tokenizer_dir(path)
    if os.path.isfile(os.path.join(saved, "tokenizer.json")):
        try:
            tok = _from_directory(saved)
        except Exception as e:  # noqa: BLE001 - a damaged copy is rebuilt below
            logger.warning(
                "could not load the saved tokenizer in %s (%s); converting the GGUF's again", saved, e
            )
        else:
            _apply_gguf_metadata(tok, meta)
            return tok
    tok = _convert_gguf_tokenizer(path, meta)
    try:
        os.makedirs(os.path.dirname(saved), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(saved), ignore_cleanup_errors=True) as staging:
            tok.save_pretrained(staging)
            os.replace(staging, saved)
    except OSError as e:  # a read-only cache, or another process won the race: use ours
        logger.debug("tokenizer of %s not saved to %s: %s", path, saved, e)
    return tok


def _saved_tokenizer_dir(path: str) -> str:
    """Cache directory of a GGUF's converted tokenizer, keyed by the file and transformers' version."""
    from pagedserve.model_files import pagedserve_cache_dir

    real = os.path.realpath(path)
    stat = os.stat(real)
    key = f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    return os.path.join(pagedserve_cache_dir(), "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:16])


def _convert_gguf_tokenizer(path: str, meta: dict[str, Any]) -> PreTrainedTokenizerBase:
    from pagedserve.models.loader.gguf import hf_model_type

    directory, filename = os.path.split(os.path.abspath(path))
    try:
        model_type = hf_model_type(str(meta.get("general.architecture")))
    except ValueError:
        tokenizer_class = None  # an architecture we cannot run may still have a usable tokenizer
    else:
        tokenizer_class = _gguf_tokenizer_class(directory, model_type)
    if tokenizer_class is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    else:
        tok = tokenizer_class.from_pretrained(directory, gguf_file=filename)
    _apply_gguf_metadata(tok, meta)
    return tok


def _gguf_tokenizer_class(directory: str, model_type: str) -> Any | None:
    """The class `AutoTokenizer` would pick for a GGUF of `model_type`, or None to let it pick.

    `AutoTokenizer.from_pretrained(dir, gguf_file=...)` first rebuilds the model config with
    gguf's GGUFReader just to learn the model type: 5 s for SmolLM2, 18 s for Gemma 3. We know the
    model type already, so ask its tokenizer class directly (0.3 s / 3.5 s), the same class that
    AutoTokenizer resolves from the model type when no tokenizer_config.json names one.
    """
    if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        return None  # a tokenizer_config.json next to the file may name the class: AutoTokenizer reads it
    try:
        from transformers.models.auto.tokenization_auto import (
            TOKENIZER_MAPPING_NAMES,
            tokenizer_class_from_name,
        )
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # transformers 4.x: the fallback class differs; AutoTokenizer knows it
        return None
    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    if not isinstance(name, str) or name in ("MistralCommonBackend", "PythonBackend"):
        return TokenizersBackend
    return tokenizer_class_from_name(name) or TokenizersBackend


def _apply_gguf_metadata(tok: PreTrainedTokenizerBase, meta: dict[str, Any]) -> None:
    """Chat template and special tokens from the GGUF metadata, where the tokenizer lacks them."""
    template = meta.get("tokenizer.chat_template")
    named = {
        key.removeprefix("tokenizer.chat_template."): value
        for key, value in meta.items()
        if key.startswith("tokenizer.chat_template.")
    }
    if named:
        tok.chat_template = {**({"default": template} if template else {}), **named}
    elif template and not tok.chat_template:
        tok.chat_template = template

    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    for attribute, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            token = tokens[int(token_id)]
            if getattr(tok, attribute) != token:
                setattr(tok, attribute, token)


def get_eos_token_ids(model_path: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end generation: the tokenizer's eos first, then the checkpoint's
    generation_config.json `eos_token_id` (int or list), or for a GGUF its eos / end-of-turn ids."""
    eos_token_ids: list[int] = []

    def add(token_id: Any) -> None:
        if token_id is None:
            return
        ids = token_id if isinstance(token_id, (list, tuple)) else [token_id]
        for one in ids:
            if one is not None and int(one) not in eos_token_ids:
                eos_token_ids.append(int(one))

    add(tokenizer.eos_token_id)
    if model_path.endswith(".gguf") and os.path.isfile(model_path):
        from pagedserve.models.loader.gguf import open_gguf

        meta = open_gguf(model_path).metadata
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            add(meta.get(f"tokenizer.ggml.{key}"))
        vocab = tokenizer.get_vocab()
        for token in _GGUF_END_OF_TURN_TOKENS.get(str(meta.get("general.architecture")), ()):
            add(vocab.get(token))
    elif os.path.isdir(model_path):
        generation_config = os.path.join(model_path, "generation_config.json")
        if os.path.isfile(generation_config):
            with open(generation_config) as f:
                add(json.load(f).get("eos_token_id"))
    return eos_token_ids
