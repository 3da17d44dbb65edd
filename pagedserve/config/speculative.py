"""Speculative decoding configuration (vLLM's SpeculativeConfig: its names, fields and defaults).

`--speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'`
on the CLI, `LLM(..., speculative_config={...})` offline. Methods:

- `ngram`: prompt lookup. The last n tokens of the request (prompt + output), for the longest n
  in [prompt_lookup_min, prompt_lookup_max], are looked up earlier in the same request; the tokens
  that followed the (earliest) match are proposed.
- `suffix`: suffix matching over the prompt and the request's own output: the longest suffix
  match (up to `suffix_decoding_max_tree_depth` tokens) and, among its occurrences, the most
  frequent continuation, token by token while its share stays at least
  `suffix_decoding_min_token_prob`; at most `suffix_decoding_max_spec_factor` x the match length
  tokens are proposed.
- `draft_model`: a smaller model with the same tokenizer and vocabulary (`model`: an HF directory
  or a .gguf file), run greedily k times after each step in the same worker, with its own KV
  tensors indexed by the target's block tables (spec_decode/draft_model.py). Given only `model`
  (not "ngram"), the method is draft_model, as in vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedserve.config.model import ModelConfig

SPECULATIVE_METHODS = ("ngram", "suffix", "draft_model")


@dataclass
class SpeculativeConfig:
    method: str | None = None
    num_speculative_tokens: int | None = None
    # ngram
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    # draft_model: the draft checkpoint (vLLM also takes "ngram"/"[ngram]" here for the method)
    model: str | None = None
    # suffix (vLLM's defaults)
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    # Any method: a step with more than this many requests (running and waiting) verifies no
    # drafts. Verifying k drafts turns each decode into k + 1 rows of every matrix product; once
    # a batch makes the step compute-bound, drafts that are rarely accepted cost throughput.
    disable_by_batch_size: int | None = None
    # draft_model: the draft checkpoint's config, resolved against the target's (resolve_draft_model)
    draft_model_config: ModelConfig | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        method = self.method
        if method is None:
            if self.model in ("ngram", "[ngram]"):
                method = "ngram"
            elif self.model is not None:
                method = "draft_model"
            else:
                raise ValueError(
                    f"speculative_config needs a method: one of {', '.join(SPECULATIVE_METHODS)}"
                )
        if method in ("ngram", "suffix") and self.model in ("ngram", "[ngram]"):
            self.model = None
        if method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}"
            )
        self.method = method
        if method == "draft_model":
            if not self.model:
                raise ValueError("speculative_config method 'draft_model' needs model (the draft checkpoint)")
            if self.num_speculative_tokens is None:
                raise ValueError("speculative_config method 'draft_model' needs num_speculative_tokens")
        if method == "ngram":
            if self.num_speculative_tokens is None:
                raise ValueError("speculative_config method 'ngram' needs num_speculative_tokens")
            if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
                # vLLM's defaults.
                self.prompt_lookup_min = self.prompt_lookup_max = 5
            elif self.prompt_lookup_min is None:
                self.prompt_lookup_min = self.prompt_lookup_max
            elif self.prompt_lookup_max is None:
                self.prompt_lookup_max = self.prompt_lookup_min
            assert self.prompt_lookup_min is not None and self.prompt_lookup_max is not None
            if self.prompt_lookup_min < 1:
                raise ValueError(f"prompt_lookup_min must be >= 1, got {self.prompt_lookup_min}")
            if self.prompt_lookup_max < self.prompt_lookup_min:
                raise ValueError(
                    f"prompt_lookup_max ({self.prompt_lookup_max}) must be >= prompt_lookup_min "
                    f"({self.prompt_lookup_min})"
                )
        if method == "suffix":
            if self.suffix_decoding_max_tree_depth < 1:
                raise ValueError("suffix_decoding_max_tree_depth must be >= 1")
            if self.suffix_decoding_max_spec_factor <= 0:
                raise ValueError("suffix_decoding_max_spec_factor must be > 0")
            if not 0 <= self.suffix_decoding_min_token_prob <= 1:
                raise ValueError("suffix_decoding_min_token_prob must be in [0, 1]")
            if self.num_speculative_tokens is None:
                self.num_speculative_tokens = self.suffix_decoding_max_tree_depth
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")
        assert self.num_speculative_tokens is not None
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")

    @classmethod
    def from_value(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """A config from `LLM(speculative_config=...)` or `--speculative-config` (JSON text)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"speculative_config has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**value)

    def resolve_draft_model(self, target: ModelConfig, tensor_parallel_size: int = 1) -> None:
        """draft_model: reads the draft checkpoint's config and checks that it can draft for `target`
        (same vocabulary, the target's context length, one worker), before any weight is loaded."""
        if self.method != "draft_model":
            return
        from pagedserve.config.model import ModelConfig

        assert self.model is not None
        if tensor_parallel_size > 1:
            raise ValueError("speculative method 'draft_model' runs with tensor_parallel_size 1 only")
        try:
            draft = ModelConfig(
                model=self.model,
                dtype=target.torch_dtype,
                max_model_len=target.max_model_len,
                seed=target.seed,
                task="generate",
            )
        except ValueError as e:
            raise ValueError(f"speculative_config draft model {self.model!r}: {e}") from None
        if draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft.vocab_size} tokens, {self.model!r}) differs from the "
                f"target's ({target.vocab_size} tokens): a draft model needs the target's tokenizer"
            )
        self.draft_model_config = draft

    def __str__(self) -> str:
        if self.method == "draft_model":
            return f"draft_model (model={self.model}, num_speculative_tokens={self.num_speculative_tokens})"
        if self.method == "ngram":
            return (
                f"ngram (num_speculative_tokens={self.num_speculative_tokens}, "
                f"prompt_lookup_min={self.prompt_lookup_min}, prompt_lookup_max={self.prompt_lookup_max})"
            )
        return (
            f"suffix (num_speculative_tokens={self.num_speculative_tokens}, "
            f"max_tree_depth={self.suffix_decoding_max_tree_depth}, "
            f"max_spec_factor={self.suffix_decoding_max_spec_factor}, "
            f"min_token_prob={self.suffix_decoding_min_token_prob})"
        )
