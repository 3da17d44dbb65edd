"""GGUF checkpoints: an HF-style config from the metadata, and HF-named dequantized weights.

A GGUF file carries no config.json and names its tensors after llama.cpp (`blk.3.attn_q.weight`).
`load_gguf_config` rebuilds the config.json a Hugging Face checkpoint of the same model would have,
and `iterate_gguf_weights` yields `(hf_name, tensor)` pairs in the layout of that checkpoint, so
models load a GGUF through the same `load_weights` loop as safetensors.

File layout (little-endian), as this module reads it:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count   × (key: string, value_type u32, value)
    tensor_count × (name: string, n_dims u32, dims u64 × n_dims, ggml_type u32, offset u64)
    padding to `general.alignment` (32) | tensor data, each tensor at data_start + offset

where a string is (length u64, utf-8 bytes) and ggml dims run fastest-first (torch order reversed).

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds a numpy view per
array element, which takes 4 s for SmolLM2's 49k-token vocabulary and 19 s for Gemma 3's 262k;
this parser takes a fraction of a second. Dequantization uses `gguf.quants.dequantize`.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, overload

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

if TYPE_CHECKING:
    import torch

# NOTE: torch is imported inside the functions that make tensors: the API server process reads
# GGUF metadata (config, tokenizer) and never imports torch.

logger = logging.getLogger(__name__)

__all__ = [
    "GGUFFile",
    "GGUFTensorInfo",
    "gguf_to_hf_name",
    "hf_model_type",
    "iterate_gguf_packed_weights",
    "iterate_gguf_weights",
    "llama3_rope_divisors",
    "load_gguf_config",
    "open_gguf",
    "packed_layout_config",
]

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}

# ggml types stored as plain values (no blocks), and their numpy dtype.
_PLAIN_NUMPY_TYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


# Arrays of more strings than this (a vocabulary, its merges) are decoded on access only.
_LAZY_STRING_ARRAY_MIN = 1024


class _StringArray(Sequence[str]):
    """A metadata array of strings, decoded item by item on access.

    The vocabulary and merges of Qwen2.5 are 300k strings: ~35 MB as Python objects, which the
    engine process (it only needs the config) would keep for nothing. Only each item's offset is
    kept (8 bytes an item).
    """

    def __init__(self, buffer: mmap.mmap, pos: int, count: int) -> None:
        self._buffer = buffer
        self._offsets = np.empty(count, dtype=np.int64)
        for i in range(count):
            self._offsets[i] = pos
            (length,) = struct.unpack_from("<Q", buffer, pos)
            pos += 8 + length
        self.end = pos

    def __len__(self) -> int:
        return len(self._offsets)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, _StringArray)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def _decode(self, i: int) -> str:
        pos = int(self._offsets[i])
        (length,) = struct.unpack_from("<Q", self._buffer, pos)
        return self._buffer[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace")

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self._decode(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._decode(index)


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: ggml's dims reversed
    ggml_type: GGMLQuantizationType
    data_offset: int  # absolute position in the file
    num_bytes: int


class GGUFFile:
    """A GGUF file's metadata (parsed eagerly) and tensors (memory-mapped, dequantized on demand)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._parse()

    # -- header -------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buffer
        if buf[:4] != _GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in _SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0:
                raise ValueError(f"{self.path} is a big-endian GGUF file; only little-endian is supported")
            raise ValueError(f"{self.path} is GGUF version {version}; supported: {_SUPPORTED_VERSIONS}")
        tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        for _ in range(kv_count):
            key, pos = self._read_string(pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            self.metadata[key], pos = self._read_value(pos + 4, GGUFValueType(value_type))

        entries: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
        for _ in range(tensor_count):
            name, pos = self._read_string(pos)
            (num_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{num_dims}Q", buf, pos + 4)
            pos += 4 + 8 * num_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            entries.append((name, tuple(reversed(dims)), GGMLQuantizationType(ggml_type), offset))

        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{self.path}: general.alignment must be a power of two, got {alignment}")
        data_start = (pos + alignment - 1) // alignment * alignment
        for name, shape, ggml_type, offset in entries:
            if name in self.tensors:
                raise ValueError(f"{self.path}: tensor {name!r} appears twice")
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            num_elements = math.prod(shape)
            if shape and shape[-1] % block_size:
                raise ValueError(
                    f"{self.path}: tensor {name!r} rows of {shape[-1]} are not whole {ggml_type.name} "
                    f"blocks of {block_size}"
                )
            num_bytes = num_elements // block_size * type_size
            info = GGUFTensorInfo(name, shape, ggml_type, data_start + offset, num_bytes)
            if info.data_offset + num_bytes > len(buf):
                raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)")
            self.tensors[name] = info

    def _read_string(self, pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", self._buffer, pos)
        end = pos + 8 + length
        raw = self._buffer[pos + 8 : end]
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), end

    def _read_value(self, pos: int, value_type: GGUFValueType) -> tuple[Any, int]:
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is not None:
            (value,) = struct.unpack_from("<" + fmt, self._buffer, pos)
            return value, pos + struct.calcsize(fmt)
        if value_type == GGUFValueType.STRING:
            return self._read_string(pos)
        if value_type != GGUFValueType.ARRAY:
            raise ValueError(f"{self.path}: unknown metadata value type {value_type}")
        (item_type_id, count) = struct.unpack_from("<IQ", self._buffer, pos)
        item_type = GGUFValueType(item_type_id)
        pos += 12
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:
            # Numeric arrays (token scores, token types) stay numpy: one copy, no per-item objects.
            array = np.frombuffer(self._buffer, dtype=np.dtype("<" + fmt), count=count, offset=pos).copy()
            return array, pos + array.nbytes
        if item_type == GGUFValueType.STRING and count > _LAZY_STRING_ARRAY_MIN:
            strings = _StringArray(self._buffer, pos, count)
            return strings, strings.end
        items = []
        for _ in range(count):
            item, pos = self._read_value(pos, item_type)
            items.append(item)
        return items, pos

    # -- tensors ------------------------------------------------------------------------------

    def raw_tensor(self, name: str) -> np.ndarray:
        """The tensor's bytes as `gguf.quants.dequantize` expects them: a read-only view of the
        file shaped (*rows, bytes_per_row), or typed values for plain (unblocked) types."""
        info = self.tensors[name]
        plain = _PLAIN_NUMPY_TYPES.get(info.ggml_type)
        if plain is not None:
            count = info.num_bytes // plain.itemsize
            return np.frombuffer(self._buffer, plain, count, info.data_offset).reshape(info.shape)
        block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
        byte_shape = (*info.shape[:-1], info.shape[-1] // block_size * type_size)
        return np.frombuffer(self._buffer, np.uint8, info.num_bytes, info.data_offset).reshape(byte_shape)

    def dequantize(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as a fresh (not file-backed) torch tensor of `dtype` (default float32), in
        torch shape."""
        import torch

        dtype = dtype or torch.float32
        info = self.tensors[name]
        raw = self.raw_tensor(name)
        if info.ggml_type in _PLAIN_NUMPY_TYPES:
            tensor = torch.from_numpy(raw.copy())
        elif info.ggml_type == GGMLQuantizationType.BF16:
            tensor = torch.from_numpy(raw.copy()).view(torch.int16).view(torch.bfloat16)
        else:
            values = dequantize(raw, info.ggml_type)
            tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        tensor = tensor.reshape(info.shape)
        return tensor.to(dtype) if dtype.is_floating_point and tensor.is_floating_point() else tensor


@lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    del size, mtime_ns  # only part of the cache key: a rewritten file is parsed again
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """A parsed `GGUFFile`, shared between the config and weight loads of one process."""
    real = os.path.realpath(os.fspath(path))
    stat = os.stat(real)
    return _open_cached(real, stat.st_size, stat.st_mtime_ns)


# -- config -----------------------------------------------------------------------------------

# GGUF architecture -> (HF architecture class, HF model_type)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}

# llama.cpp's Gemma 3 code fixes what its converter does not write: every 6th layer is global and
# local layers rotate with base 10000.
_GEMMA3_SLIDING_WINDOW_PATTERN = 6
_GEMMA3_ROPE_LOCAL_BASE_FREQ = 10000.0
_GEMMA3_27B_NUM_LAYERS = 62


def hf_model_type(architecture: str) -> str:
    """The transformers `model_type` for a GGUF `general.architecture`."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported; supported: {sorted(_ARCHITECTURES)}"
        )
    return _ARCHITECTURES[architecture][1]


def load_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json (as a dict) of the Hugging Face checkpoint this GGUF file was made from."""
    gguf_file = open_gguf(path)
    meta = gguf_file.metadata
    arch = str(meta.get("general.architecture", ""))
    hf_architecture, model_type = _ARCHITECTURES.get(arch, (None, None))
    if hf_architecture is None or model_type is None:
        raise ValueError(
            f"{gguf_file.path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {sorted(_ARCHITECTURES)}"
        )

    def required(key: str) -> Any:
        full_key = f"{arch}.{key}"
        if full_key not in meta:
            raise ValueError(f"{gguf_file.path}: metadata key {full_key!r} is missing")
        return meta[full_key]

    def optional(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden_size = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    num_kv_heads = int(optional("attention.head_count_kv", num_heads))
    head_dim = optional("attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = optional("rope.dimension_count")
    head_dim = int(head_dim) if head_dim is not None else hidden_size // num_heads
    num_layers = int(required("block_count"))
    rope_theta = float(optional("rope.freq_base", 10000.0))

    config: dict[str, Any] = {
        "architectures": [hf_architecture],
        "model_type": model_type,
        "vocab_size": _vocab_size(gguf_file),
        "hidden_size": hidden_size,
        "intermediate_size": int(required("feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(required("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(gguf_file, arch, rope_theta, head_dim),
        "max_position_embeddings": int(optional("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in gguf_file.tensors,
        "torch_dtype": _checkpoint_dtype(gguf_file),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in gguf_file.tensors,
    }
    for gguf_name, hf_name in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk")):
        token_id = meta.get(f"tokenizer.ggml.{gguf_name}_token_id")
        if token_id is not None:
            config[f"{hf_name}_token_id"] = int(token_id)

    if arch == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in gguf_file.tensors
    elif arch in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
        config["sliding_window"] = None
    elif arch == "gemma3":
        config.update(_gemma3_config(gguf_file, arch, num_layers, hidden_size, num_heads, head_dim))
    return config


def _vocab_size(gguf_file: GGUFFile) -> int:
    embedding = gguf_file.tensors.get("token_embd.weight")
    if embedding is not None:
        return int(embedding.shape[0])
    tokens = gguf_file.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{gguf_file.path}: neither token_embd.weight nor a token list gives the vocab size")
    return len(tokens)


def _checkpoint_dtype(gguf_file: GGUFFile) -> str:
    # Dequantized blocks are float32 values; a file of only plain half tensors (norms aside, which
    # llama.cpp keeps in F32) is that half type.
    types = {info.ggml_type for info in gguf_file.tensors.values()}
    if types - {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}:
        return "float32"
    if GGMLQuantizationType.BF16 in types:
        return "bfloat16"
    if GGMLQuantizationType.F16 in types:
        return "float16"
    return "float32"


def _rope_scaling(gguf_file: GGUFFile, arch: str, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    meta = gguf_file.metadata
    prefix = f"{arch}.rope.scaling."
    scaling_type = meta.get(prefix + "type")
    if scaling_type is not None and scaling_type != "none":
        scaling: dict[str, Any] = {"rope_type": scaling_type, "type": scaling_type}
        renames = {
            "factor": "factor",
            "original_context_length": "original_max_position_embeddings",
            "attn_factor": "attention_factor",
            "yarn_beta_fast": "beta_fast",
            "yarn_beta_slow": "beta_slow",
        }
        for gguf_key, hf_key in renames.items():
            value = meta.get(prefix + gguf_key)
            if value is not None:
                scaling[hf_key] = int(value) if hf_key == "original_max_position_embeddings" else float(value)
        return scaling
    if "rope_freqs.weight" in gguf_file.tensors:
        return _llama3_rope_scaling(gguf_file, rope_theta, head_dim)
    return None


def _llama3_rope_scaling(gguf_file: GGUFFile, rope_theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3.1+ GGUFs store rope scaling as per-frequency divisors (`rope_freqs.weight`), not as
    parameters. Every published Llama 3 uses low/high frequency factors 1 and 4 around an original
    context of 8192; rebuild those parameters and check that they reproduce the stored divisors."""
    import torch

    stored = gguf_file.dequantize("rope_freqs.weight").double()
    factor = float(stored.max())
    scaling: dict[str, Any] = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = llama3_rope_divisors(rope_theta, head_dim, scaling)
    if expected.shape != stored.shape or not torch.allclose(expected, stored, rtol=1e-5, atol=1e-5):
        raise ValueError(
            f"{gguf_file.path}: rope_freqs.weight does not match Llama 3 rope scaling with factor "
            f"{factor}; this rope scaling is not supported"
        )
    return scaling


def llama3_rope_divisors(rope_theta: float, head_dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 rope scaling (the values llama.cpp stores in rope_freqs)."""
    import torch

    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    smooth = (original / wavelen - low) / (high - low)
    divisors = 1.0 / ((1.0 - smooth) / factor + smooth)
    divisors = torch.where(wavelen < original / high, torch.ones_like(divisors), divisors)
    return torch.where(wavelen > original / low, torch.full_like(divisors, factor), divisors)


def _gemma3_config(
    gguf_file: GGUFFile, arch: str, num_layers: int, hidden_size: int, num_heads: int, head_dim: int
) -> dict[str, Any]:
    meta = gguf_file.metadata
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", _GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, (int, np.integer)):
        period = int(pattern)
        is_sliding = [i % period != period - 1 for i in range(num_layers)]
    else:
        is_sliding = [bool(flag) for flag in pattern]
        if len(is_sliding) != num_layers:
            raise ValueError(f"{gguf_file.path}: sliding_window_pattern has {len(is_sliding)} entries")
        period = _GEMMA3_SLIDING_WINDOW_PATTERN

    attention_scale = meta.get(f"{arch}.attention.scale")
    if attention_scale is not None:
        query_pre_attn_scalar: float = 1.0 / float(attention_scale) ** 2
    elif num_layers == _GEMMA3_27B_NUM_LAYERS:
        # Gemma 3 27B scales queries by hidden_size / num_heads, not head_dim (as llama.cpp does).
        query_pre_attn_scalar = hidden_size // num_heads
    else:
        query_pre_attn_scalar = head_dim
    if float(query_pre_attn_scalar).is_integer():
        query_pre_attn_scalar = int(query_pre_attn_scalar)

    sliding_window = meta.get(f"{arch}.attention.sliding_window")
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(sliding_window) if sliding_window is not None else None,
        "sliding_window_pattern": period,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in is_sliding],
        "rope_local_base_freq": float(meta.get(f"{arch}.rope.freq_base_swa", _GEMMA3_ROPE_LOCAL_BASE_FREQ)),
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "final_logit_softcapping": meta.get(f"{arch}.final_logit_softcapping"),
        "attn_logit_softcapping": meta.get(f"{arch}.attn_logit_softcapping"),
        "use_bidirectional_attention": False,
    }


# -- weights ----------------------------------------------------------------------------------

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}

# Gemma 3 norms around both blocks: llama.cpp's ffn_norm is the *pre*-feedforward norm there.
_GEMMA3_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Tensors that only feed what the config already says (rope_freqs -> rope_scaling).
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight"}


def gguf_to_hf_name(gguf_name: str, arch: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (KeyError if unknown)."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise KeyError(gguf_name)
    if base.startswith("blk."):
        _, layer, tensor = base.split(".", 2)
        table = _GEMMA3_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS
        return f"model.layers.{int(layer)}.{table[tensor]}.{suffix}"
    return f"{_GLOBAL_TENSORS[base]}.{suffix}"


def _unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's llama converter, which reorders each head's q/k rows from HF's half-split
    rotary layout to interleaved pairs:

        HF   row of head h:  [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]
        GGUF row of head h:  [x_0, y_0, x_1, y_1, ...]
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot split {rows} rows into {num_heads} rotary heads")
    rest = weight.shape[1:]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def iterate_gguf_weights(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight, dequantized to `dtype` one tensor at a time, in
    the layout of the HF checkpoint (`lm_head.weight` only when the file has an output tensor)."""
    for hf_name, tensor in _iterate(path, packed=False):
        yield hf_name, (tensor if dtype is None else tensor.to(dtype)).contiguous()


def iterate_gguf_packed_weights(path: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """Yield `(hf_name, weight)`: every 2-D tensor (linear layers, embeddings) as a
    `GGUFWeight` over the memory-mapped file, the rest (norms, biases) as float32 tensors.

    q/k rows stay in llama.cpp's order for Llama (interleaved rotary pairs, see
    `_unpermute_rotary_rows`); `packed_layout_config` tells the model to rotate them that way.
    """
    yield from _iterate(path, packed=True)


def packed_layout_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Config keys a model needs to run this file's packed weights: Llama's q/k rows are left in
    llama.cpp's interleaved rotary order (`rope_is_neox_style` False, vLLM's `is_neox_style`)."""
    arch = str(open_gguf(path).metadata.get("general.architecture", ""))
    return {"rope_is_neox_style": False} if arch == "llama" else {}


def _iterate(path: str | os.PathLike[str], packed: bool) -> Iterator[tuple[str, Any]]:
    from pagedserve.kernels.gguf_ops import SUPPORTED_TYPES
    from pagedserve.quantization.gguf import GGUFWeight

    gguf_file = open_gguf(path)
    config = load_gguf_config(path)
    arch = str(gguf_file.metadata["general.architecture"])
    for gguf_name, info in gguf_file.tensors.items():
        if gguf_name in _CONFIG_ONLY_TENSORS:
            continue
        try:
            hf_name = gguf_to_hf_name(gguf_name, arch)
        except (KeyError, ValueError):
            raise ValueError(
                f"{gguf_file.path}: tensor {gguf_name!r} has no Hugging Face name for architecture "
                f"{arch!r} (an unsupported variant of the model?)"
            ) from None
        if packed and len(info.shape) == 2:
            if info.ggml_type in SUPPORTED_TYPES:
                data = _file_view(gguf_file.raw_tensor(gguf_name).view(np.uint8)).reshape(info.shape[0], -1)
                yield hf_name, GGUFWeight(data, info.ggml_type, info.shape, from_file=True)
            else:
                yield hf_name, GGUFWeight.from_dense(gguf_file.dequantize(gguf_name))
            continue
        # Dequantize in float32 so the corrections below are exact before the final cast.
        tensor = gguf_file.dequantize(gguf_name)
        if arch == "llama" and not packed:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _unpermute_rotary_rows(tensor, config["num_attention_heads"])
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = _unpermute_rotary_rows(tensor, config["num_key_value_heads"])
        elif arch == "gemma3" and gguf_name.endswith("norm.weight"):
            # llama.cpp's converter stores Gemma's RMSNorm weights as (1 + w) because its RMSNorm
            # computes x * w; HF's Gemma3RMSNorm computes x * (1 + w) from the raw w.
            tensor = tensor - 1.0
        yield hf_name, tensor


def _file_view(array: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only slice of the memory-mapped file.

    NOTE: torch warns that it cannot protect a read-only array from writes. Nothing writes to
    packed weights, and the mapping is read-only: a write would fault, never change the file.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
