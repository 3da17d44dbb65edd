"""EngineArgs: every engine setting, one field per CLI flag, named as vLLM names them."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, fields
from typing import Any

from pagedserve.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    StructuredOutputsConfig,
)
from pagedserve.config.parallel import DEFAULT_DP_RPC_PORT

_MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory_size(value: str | int | None) -> int | None:
    """'4GiB', '512m', '1073741824' -> bytes."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
    if not match:
        raise ValueError(f"cannot parse memory size {value!r} (examples: 4GiB, 512MiB, 1073741824)")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


@dataclass
class EngineArgs:
    """Field `foo_bar` is CLI flag `--foo-bar`; the help text is the field's metadata."""

    model: str | None = dataclasses.field(
        default=None, metadata={"help": "HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)"}
    )
    tokenizer: str | None = dataclasses.field(default=None, metadata={"help": "tokenizer directory (default: the model's)"})
    dtype: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "activation dtype: auto, float32, bfloat16 or float16 (auto: bfloat16 for a half-precision "
            "checkpoint on a CPU with AVX-512 BF16 / AMX, else float32)"
        },
    )
    quantization: str | None = dataclasses.field(
        default=None,
        metadata={"help": "weight format: gguf (implied by a .gguf file: its blocks are computed in place)"},
    )
    max_model_len: int | None = dataclasses.field(
        default=None, metadata={"help": "longest sequence (prompt + output) in tokens (default: the model's)"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "global random seed"})
    block_size: int = dataclasses.field(default=16, metadata={"help": "tokens per KV cache block"})
    kv_cache_memory: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "KV cache size, e.g. 2GiB (default: as much as the weights take, at least 512MiB, at "
            "most 10%% of RAM, and never more than max_num_seqs sequences of max_model_len can use)"
        },
    )
    kv_cache_dtype: str = dataclasses.field(
        default="auto",
        metadata={"help": "KV cache storage: auto (the model's dtype), float32, bfloat16 or float16"},
    )
    num_gpu_blocks_override: int | None = dataclasses.field(
        default=None, metadata={"help": "use exactly this many KV cache blocks (testing)"}
    )
    enable_prefix_caching: bool = dataclasses.field(
        default=True, metadata={"help": "reuse KV cache blocks of identical prefixes"}
    )
    prefix_caching_hash_seed: int | None = dataclasses.field(
        default=None, metadata={"help": "seed of the prefix-cache hash chain (default: random per process)"}
    )
    max_num_seqs: int = dataclasses.field(default=256, metadata={"help": "most requests in one step"})
    max_num_batched_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "token budget of one step (default: 2048, or max_model_len without chunking)"}
    )
    enable_chunked_prefill: bool = dataclasses.field(
        default=True, metadata={"help": "split long prompts over several steps"}
    )
    scheduling_policy: str = dataclasses.field(default="fcfs", metadata={"help": "fcfs or priority"})
    async_scheduling: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "schedule step n+1 while step n runs (the outputs of synchronous scheduling, except "
            "seeded sampling of a request preempted while its step was in flight)"
        },
    )
    disable_hybrid_kv_cache_manager: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "keep every block of sliding-window layers as if they were full attention "
            "(one KV-cache group; the window still applies to attention)"
        },
    )
    structured_outputs_backend: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "structured outputs backend for every constrained request: auto (xgrammar), xgrammar "
            "or guidance (llguidance)"
        },
    )
    tensor_parallel_size: int = dataclasses.field(default=1, metadata={"help": "number of tensor-parallel workers"})
    pipeline_parallel_size: int = dataclasses.field(
        default=1,
        metadata={"help": "pipeline stages: the layers split into this many stages, each on its own worker(s)"},
    )
    distributed_executor_backend: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "who runs the workers: mp (processes on this host) or ray (actors of a Ray cluster: "
            "RAY_ADDRESS, else a local one); default: mp for several workers"
        },
    )
    data_parallel_size: int = dataclasses.field(
        default=1, metadata={"help": "engine cores (each with its own workers) behind one API server"}
    )
    data_parallel_size_local: int | None = dataclasses.field(
        default=None, metadata={"help": "engine cores on this host (default: all from --data-parallel-start-rank on)"}
    )
    data_parallel_start_rank: int = dataclasses.field(
        default=0, metadata={"help": "data-parallel rank of this host's first engine core (with --headless)"}
    )
    data_parallel_address: str = dataclasses.field(
        default="127.0.0.1", metadata={"help": "address of the API server's host, as the engine cores reach it"}
    )
    data_parallel_rpc_port: int = dataclasses.field(
        default=DEFAULT_DP_RPC_PORT,
        metadata={"help": "first of the three ports the API server opens for remote engine cores"},
    )
    data_parallel_prefix_affinity: bool = dataclasses.field(
        default=False,
        metadata={"help": "send a request to the engine core that served its prompt's prefix (unless much busier)"},
    )
    # --- LoRA adapters ---
    enable_lora: bool = dataclasses.field(
        default=False, metadata={"help": "serve PEFT LoRA adapters over the base model (per request)"}
    )
    max_loras: int = dataclasses.field(default=1, metadata={"help": "most distinct LoRA adapters in one step"})
    max_lora_rank: int = dataclasses.field(default=16, metadata={"help": "largest LoRA rank accepted"})
    max_cpu_loras: int | None = dataclasses.field(
        default=None, metadata={"help": "LoRA adapters kept loaded in CPU memory (default: max_loras)"}
    )
    # --- speculative decoding ---
    speculative_config: str | dict[str, Any] | SpeculativeConfig | None = dataclasses.field(
        default=None,
        metadata={
            "help": "speculative decoding as JSON (vLLM's fields), e.g. "
            '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\'; '
            "methods: ngram (prompt_lookup_min/max), suffix, draft_model (model: a smaller checkpoint with "
            "the same vocabulary)"
        },
    )
    # --- pooling models ---
    task: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "auto, generate, embed, classify or score (vLLM's --task): auto = the model's own "
            "task; embed on a generative checkpoint pools its last token"
        },
    )

    def create_engine_config(self) -> EngineConfig:
        from pagedserve.model_files import default_model

        model = self.model or default_model()
        model_config = ModelConfig(
            model=model,
            tokenizer=self.tokenizer,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            seed=self.seed,
            task=self.task,  # type: ignore[arg-type]
            quantization=self.quantization,
        )
        model_config.verify_with_parallel_config(self.tensor_parallel_size, self.pipeline_parallel_size)
        max_model_len = int(model_config.max_model_len)  # type: ignore[arg-type]
        enable_chunked_prefill = self.enable_chunked_prefill
        enable_prefix_caching = self.enable_prefix_caching
        if model_config.runner_type == "pooling" and not model_config.supports_chunked_pooling:
            # Bidirectional attention (or CLS/mean pooling) needs each prompt whole in one step,
            # and an encoder-only model keeps no KV cache to share.
            enable_chunked_prefill = enable_prefix_caching = False
        speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        async_scheduling = self.async_scheduling
        if speculative_config is not None:
            if model_config.runner_type != "generate":
                raise ValueError("speculative decoding needs a generative model (task generate)")
            if self.pipeline_parallel_size > 1:
                raise ValueError("speculative decoding does not work with pipeline_parallel_size > 1")
            speculative_config.resolve_draft_model(model_config, self.tensor_parallel_size)
        max_num_batched_tokens = self.max_num_batched_tokens
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048 if enable_chunked_prefill else max(2048, max_model_len)
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory_bytes=parse_memory_size(self.kv_cache_memory),
                enable_prefix_caching=enable_prefix_caching,
                prefix_caching_hash_seed=self.prefix_caching_hash_seed,
                num_gpu_blocks=self.num_gpu_blocks_override,
                cache_dtype=self.kv_cache_dtype,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                enable_chunked_prefill=enable_chunked_prefill,
                policy=self.scheduling_policy,  # type: ignore[arg-type]
                async_scheduling=async_scheduling,
                runner_type=model_config.runner_type,
                disable_hybrid_kv_cache_manager=self.disable_hybrid_kv_cache_manager,
            ),
            parallel_config=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                pipeline_parallel_size=self.pipeline_parallel_size,
                distributed_executor_backend=self.distributed_executor_backend,  # type: ignore[arg-type]
                data_parallel_size=self.data_parallel_size,
                data_parallel_size_local=self.data_parallel_size_local,
                data_parallel_start_rank=self.data_parallel_start_rank,
                data_parallel_address=self.data_parallel_address,
                data_parallel_rpc_port=self.data_parallel_rpc_port,
                data_parallel_prefix_affinity=self.data_parallel_prefix_affinity,
            ),
            structured_outputs_config=StructuredOutputsConfig(backend=self.structured_outputs_backend),
            lora_config=LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras) if self.enable_lora else None,
            speculative_config=speculative_config,
        )

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        for f in fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
                continue
            type_name = str(f.type)
            arg_type: Any = int if type_name.startswith("int") else str
            parser.add_argument(flag, type=arg_type, default=f.default, help=help_text)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
