"""Model configuration: what the checkpoint is and how to run it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, get_args

from pagedserve.pooling_params import PoolingTask

if TYPE_CHECKING:
    import torch

    from pagedserve.models.registry import ModelInfo

logger = logging.getLogger(__name__)

# `task` of a model (vLLM's `--task`): what the engine is built to do with the checkpoint.
TaskOption = Literal["auto", "generate", "embed", "classify", "score"]
_TASK_OPTIONS: tuple[str, ...] = get_args(TaskOption)
RunnerType = Literal["generate", "pooling"]
PoolingType = Literal["CLS", "MEAN", "LAST"]
_POOLING_TYPES: tuple[str, ...] = get_args(PoolingType)
# sentence-transformers' 1_Pooling/config.json flags -> our pooling type.
_ST_POOLING_MODES: dict[str, PoolingType] = {
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_lasttoken": "LAST",
}

# NOTE: dtypes by name: this module is imported by the API server process, which never imports
# torch (~200 MB resident); `torch_dtype`/`weight_dtype` import it when first asked.
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix units (AVX512-BF16 / AMX), where bf16 GEMMs beat fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _load_hf_config_dict(model: str) -> dict[str, Any]:
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"model file {model!r} does not exist")
        from pagedserve.models.loader.gguf import load_gguf_config

        return load_gguf_config(model)
    if not os.path.isdir(model):
        raise ValueError(
            f"model {model!r} is neither a directory with config.json nor a .gguf file "
            "(there is no model hub here: pass a local path)"
        )
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model directory {model!r} has no config.json")
    with open(path) as f:
        return json.load(f)


def _normalize_rope(cfg: dict[str, Any]) -> None:
    """Bring transformers v4 (`rope_theta` + `rope_scaling`) and v5 (`rope_parameters`) forms
    to one: `rope_theta` float and `rope_scaling` dict or None (None = plain RoPE)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        cfg.setdefault("rope_theta", params["rope_theta"])
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            cfg["rope_scaling"] = dict(params)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        cfg["rope_scaling"] = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("rope_scaling", None)


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model turns hidden states into one vector per prompt (vLLM's PoolerConfig).

    Resolved by ModelConfig from the sentence-transformers files next to the checkpoint
    (`modules.json`, `1_Pooling/config.json`, a `Normalize` module) or, without them, from the
    model's defaults (CLS for BERT-style encoders, LAST for decoders; normalised embeddings).
    """

    pooling_type: PoolingType
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in _POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {list(_POOLING_TYPES)}, got {self.pooling_type!r}")


def _read_json(path: str) -> Any | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _sentence_transformers_pooler_config(model_dir: str) -> PoolerConfig | None:
    """The pooling and normalisation a sentence-transformers checkpoint declares, or None."""
    modules = _read_json(os.path.join(model_dir, "modules.json"))
    if not isinstance(modules, list):
        return None
    pooling_type: PoolingType | None = None
    normalize = False
    for module in modules:
        module_type = str(module.get("type", ""))
        if module_type.endswith(".Normalize"):
            normalize = True
        elif module_type.endswith(".Pooling"):
            pooling = _read_json(os.path.join(model_dir, module.get("path", ""), "config.json")) or {}
            modes = [mode for mode, on in pooling.items() if mode.startswith("pooling_mode_") and on]
            unsupported = [mode for mode in modes if mode not in _ST_POOLING_MODES]
            if unsupported or len(modes) != 1:
                raise ValueError(
                    f"{model_dir}: sentence-transformers pooling {modes} is not supported; "
                    f"supported: exactly one of {sorted(_ST_POOLING_MODES)}"
                )
            pooling_type = _ST_POOLING_MODES[modes[0]]
    if pooling_type is None:
        return None
    return PoolerConfig(pooling_type=pooling_type, normalize=normalize)


@dataclass
class ModelConfig:
    """A checkpoint (HF directory or .gguf file) and how to run it.

    `hf_config` is the checkpoint's config.json (or the GGUF metadata turned into one) as an
    attribute namespace; models read their sizes from it.

    `task` (vLLM's `--task`) picks the workflow the engine is assembled for:
    - "generate": a generative (decoder) model samples tokens;
    - "embed": one vector per prompt. Encoder models (BertModel, XLMRobertaModel) pool as their
      sentence-transformers files say; a generative checkpoint becomes an embedder that pools
      its last token's final hidden state (after the final norm);
    - "classify": a sequence classifier's label probabilities;
    - "score": a cross-encoder's score of a text pair (a classifier with one label), or the
      cosine similarity of two embeddings for an embedding model;
    - "auto" (default): the model's first pooling task if it is a pooling model, else generate.
    Every task but "generate" uses the pooling runner (`runner_type == "pooling"`).
    """

    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    seed: int = 0
    task: TaskOption = "auto"
    # vLLM's --quantization: how the weights are stored and computed. A .gguf file implies
    # "gguf" (its blocks are used in place); None = the checkpoint's float weights.
    quantization: str | None = None
    hf_config: SimpleNamespace = field(init=False)
    # The activation dtype's name ("float32", ...): see torch_dtype.
    dtype_name: str = field(init=False)
    # Storage dtype of the float linear and embedding weights: the activation dtype, except a
    # half-precision checkpoint computed in float32 on a CPU without bf16 units (dtype auto): its
    # weights stay in their half dtype, converted row by row inside the kernels (half the memory
    # and bandwidth). See weight_dtype.
    weight_dtype_name: str = field(init=False)
    # Worker-side pooling tasks the loaded model serves (empty for generation).
    pooling_tasks: tuple[PoolingTask, ...] = field(init=False, default=())
    # Bidirectional attention over whole prompts, no KV cache (BERT-style encoders).
    is_encoder_only: bool = field(init=False, default=False)
    pooler_config: PoolerConfig | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        cfg = _load_hf_config_dict(self.model)
        if "text_config" in cfg and "hidden_size" not in cfg:
            cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
        _normalize_rope(cfg)
        if not cfg.get("architectures"):
            raise ValueError(f"config of {self.model!r} names no architectures")
        from pagedserve.models.registry import resolve_model_info

        # An unsupported model fails here, before loading.
        model_info, arch = resolve_model_info(cfg["architectures"])
        num_heads = cfg.get("num_attention_heads")
        cfg.setdefault("num_key_value_heads", num_heads)
        if cfg.get("head_dim") is None and num_heads:
            cfg["head_dim"] = cfg["hidden_size"] // num_heads
        self._resolve_quantization(cfg)
        self.hf_config = SimpleNamespace(**cfg)
        self.dtype_name = self._resolve_dtype(cfg)
        ckpt = _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), "float32")
        half_weights = (
            self.dtype == "auto" and self.dtype_name == "float32" and ckpt != "float32" and not self.is_gguf
        )
        self.weight_dtype_name = ckpt if half_weights else self.dtype_name
        self._resolve_task(model_info, arch)
        self.supports_pp = model_info.supports_pp

        max_positions_fn = model_info.max_positions
        max_positions = int(max_positions_fn(cfg) if max_positions_fn else cfg.get("max_position_embeddings") or 2048)
        if self.max_model_len is None:
            self.max_model_len = max_positions
            st_max_seq_length = self._sentence_transformers_max_seq_length()
            if st_max_seq_length is not None and self.runner_type == "pooling":
                # sentence-transformers truncates at max_seq_length; we reject (or truncate on
                # request) instead of silently embedding a different text.
                self.max_model_len = min(max_positions, st_max_seq_length)
        elif self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        elif self.max_model_len > max_positions and cfg.get("rope_scaling") is None:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={max_positions}"
            )

    def _resolve_quantization(self, cfg: dict[str, Any]) -> None:
        from pagedserve.quantization import QUANTIZATION_METHODS

        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization must be one of {list(QUANTIZATION_METHODS)}, got {self.quantization!r}"
            )
        if self.is_gguf:
            self.quantization = "gguf"
            from pagedserve.models.loader.gguf import packed_layout_config

            cfg.update(packed_layout_config(self.model))
        elif self.quantization == "gguf":
            raise ValueError(f"quantization='gguf' needs a .gguf file; {self.model!r} is not one")

    def _resolve_task(self, model_info: ModelInfo, arch: str) -> None:
        if self.task not in _TASK_OPTIONS:
            raise ValueError(f"task must be one of {list(_TASK_OPTIONS)}, got {self.task!r}")
        model_tasks: tuple[PoolingTask, ...] = model_info.pooling_tasks  # type: ignore[assignment]
        task = self.task
        if task == "auto":
            task = model_tasks[0] if model_tasks else "generate"
        if task == "generate":
            if model_tasks:
                raise ValueError(
                    f"{arch} is a pooling model ({', '.join(model_tasks)}); it cannot generate text. "
                    "Use a generative checkpoint, or LLM.embed/classify/score with this one"
                )
        elif model_tasks:
            cross_encoder = "classify" in model_tasks
            if task == "score" and cross_encoder and self.num_labels != 1:
                raise ValueError(
                    f"task='score' needs a cross-encoder with one label; {arch} has {self.num_labels} labels"
                )
            if task not in model_tasks and not (task == "score" and "embed" in model_tasks):
                raise ValueError(f"{arch} supports tasks {list(model_tasks)}, not {task!r}")
        else:
            if task == "classify":
                raise ValueError(
                    f"{arch} is a generative model; it can be used as an embedder (task='embed', "
                    "last-token pooling) but has no classifier head for task='classify'"
                )
            model_tasks = ("embed",)  # converted: the pooler replaces the LM head
        self.task = task  # type: ignore[assignment]
        self.pooling_tasks = model_tasks if task != "generate" else ()
        self.is_encoder_only = model_info.is_encoder_only
        if task == "generate":
            return
        pooler_config = None if self.is_gguf else _sentence_transformers_pooler_config(self.model)
        if pooler_config is None:
            pooler_config = PoolerConfig(pooling_type=model_info.default_pooling_type)  # type: ignore[arg-type]
        self.pooler_config = pooler_config
        # NOTE: models are built from hf_config alone (see model_loader.get_model), so the
        # resolved pooler config travels to their constructor inside it.
        self.hf_config.pooler_config = pooler_config

    def _sentence_transformers_max_seq_length(self) -> int | None:
        if self.is_gguf:
            return None
        st_config = _read_json(os.path.join(self.model, "sentence_bert_config.json"))
        if isinstance(st_config, dict) and st_config.get("max_seq_length"):
            return int(st_config["max_seq_length"])
        return None

    @property
    def runner_type(self) -> RunnerType:
        return "generate" if self.task == "generate" else "pooling"

    @property
    def is_cross_encoder(self) -> bool:
        """A classifier with one label: scores a text pair tokenized together."""
        return "classify" in self.pooling_tasks and self.num_labels == 1

    @property
    def num_labels(self) -> int:
        id2label = getattr(self.hf_config, "id2label", None)
        if id2label:
            return len(id2label)
        return int(getattr(self.hf_config, "num_labels", 2))

    @property
    def embedding_size(self) -> int:
        return int(self.hf_config.hidden_size)

    @property
    def supports_chunked_pooling(self) -> bool:
        """Whether a pooling model's prompt may be split over steps or start from prefix-cache
        hits: only causal attention with last-token pooling (the last token sees everything)."""
        assert self.pooler_config is not None
        return not self.is_encoder_only and self.pooler_config.pooling_type == "LAST"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The activation dtype (and the float weights', but see weight_dtype)."""
        return _torch_dtype(self.dtype_name)

    @property
    def weight_dtype(self) -> torch.dtype:
        return _torch_dtype(self.weight_dtype_name)

    def _resolve_dtype(self, cfg: dict[str, Any]) -> str:
        if not isinstance(self.dtype, str):  # a torch.dtype
            return str(self.dtype).removeprefix("torch.")
        if self.dtype != "auto":
            if self.dtype not in _DTYPES:
                raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
            return _DTYPES[self.dtype]
        # auto: half-precision checkpoints run in bf16 where the CPU has bf16 units, else fp32.
        # GGUF blocks meet int8-quantized activations in the kernels, whatever the dtype: their
        # activations stay float32 (exact, and no conversions around every kernel call).
        ckpt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        native_bf16 = cpu_has_native_bf16()
        if ckpt in ("bfloat16", "float16") and not self.is_gguf and native_bf16:
            dtype, reason = "bfloat16", f"a {ckpt} checkpoint on a CPU with AVX-512 BF16 / AMX"
        elif ckpt in ("bfloat16", "float16") and not self.is_gguf:
            dtype = "float32"
            reason = f"a {ckpt} checkpoint on a CPU without AVX-512 BF16 / AMX; its weights stay {ckpt}"
        else:
            dtype, reason = "float32", "GGUF blocks" if self.is_gguf else f"a {ckpt} checkpoint"
        logger.info("dtype auto: %s (%s)", dtype, reason)
        return dtype

    @property
    def architectures(self) -> list[str]:
        return list(self.hf_config.architectures)

    @property
    def is_gguf(self) -> bool:
        return self.model.endswith(".gguf")

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.head_dim)

    def verify_with_parallel_config(self, tensor_parallel_size: int, pipeline_parallel_size: int = 1) -> None:
        """Tensor parallelism splits query heads evenly; KV heads are split or replicated. Pipeline
        parallelism gives each stage at least one layer of a generative model."""
        if pipeline_parallel_size > 1:
            num_layers = int(getattr(self.hf_config, "num_hidden_layers", 0) or 0)
            if self.runner_type != "generate":
                raise ValueError("pipeline_parallel_size > 1 needs a generative model (task generate)")
            if not self.supports_pp:
                raise ValueError(
                    f"{self.architectures[0]} does not split into pipeline stages; "
                    "use pipeline_parallel_size=1"
                )
            if num_layers < pipeline_parallel_size:
                raise ValueError(
                    f"the model's {num_layers} layers cannot fill pipeline_parallel_size={pipeline_parallel_size} stages"
                )
        num_heads = int(getattr(self.hf_config, "num_attention_heads", 0) or 0)
        num_kv_heads = int(getattr(self.hf_config, "num_key_value_heads", 0) or 0)
        if tensor_parallel_size == 1 or not num_heads:
            return
        if num_heads % tensor_parallel_size:
            raise ValueError(
                f"the model's {num_heads} attention heads are not divisible by "
                f"tensor_parallel_size={tensor_parallel_size}"
            )
        if num_kv_heads % tensor_parallel_size and tensor_parallel_size % num_kv_heads:
            raise ValueError(
                f"the model's {num_kv_heads} KV heads can neither be split over nor replicated onto "
                f"tensor_parallel_size={tensor_parallel_size} ranks"
            )
