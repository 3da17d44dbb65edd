"""POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's tokenizer endpoints)."""

from __future__ import annotations

from typing import Any

from pagedserve.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    OpenAIRequestError,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from pagedserve.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def create_tokenize(
        self, request: TokenizeCompletionRequest | TokenizeChatRequest
    ) -> TokenizeResponse:
        """Token ids exactly as /v1/completions (prompt) or /v1/chat/completions (messages) would
        feed them to the model."""
        self.models.check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            self._check_chat_request(request)
        else:
            self._check_prompt_chars(request.prompt, "prompt")
        return await self._in_tokenizer_thread(self._tokenize, request)

    def _tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        text = (
            self._apply_chat_template(request) if isinstance(request, TokenizeChatRequest) else request.prompt
        )
        token_ids = self._tokenize_text(text, request.add_special_tokens, None)
        token_strs = self.tokenizer.convert_ids_to_tokens(token_ids) if request.return_token_strs else None
        return TokenizeResponse(
            count=len(token_ids), max_model_len=self.max_model_len, tokens=token_ids, token_strs=token_strs
        )

    async def create_detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.models.check_model(request.model)
        vocab_size = len(self.tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab_size]
        if bad:
            raise OpenAIRequestError(
                f"token ids must be in [0, {vocab_size}) (the vocabulary), got {bad[:5]}", param="tokens"
            )
        return DetokenizeResponse(
            prompt=await self._in_tokenizer_thread(self.tokenizer.decode, request.tokens)
        )

    def get_tokenizer_info(self) -> TokenizerInfoResponse:
        tokenizer = self.tokenizer
        info: dict[str, Any] = {
            "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "model_max_length": self.max_model_len,
            "chat_template": self.chat_template or getattr(tokenizer, "chat_template", None),
            "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        }
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            info[name] = getattr(tokenizer, name, None)
            info[f"{name}_id"] = getattr(tokenizer, f"{name}_id", None)
        return TokenizerInfoResponse(**info)
