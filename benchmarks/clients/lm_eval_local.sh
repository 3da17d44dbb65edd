#!/usr/bin/env bash
# lm-evaluation-harness against `pagedserve serve`, compared with lm-eval's own transformers
# backend (`--model hf`) on the same float32 weights, on two local tasks (no dataset hub):
# pagedserve_mc (multiple_choice: loglikelihood over /v1/completions with echo + logprobs) and
# pagedserve_gen (generate_until: greedy generation with stop strings).
#
#   python -m venv /tmp/clients-venv
#   /tmp/clients-venv/bin/pip install torch==2.13.0 'lm-eval[api,hf]==0.4.13'
#   benchmarks/clients/lm_eval_local.sh            # from the repository root
#
# lm-eval lives in its own virtualenv (VENV, default /tmp/clients-venv) so that its pins never
# touch the project's environment; pagedserve runs with PYTHON (default: python). The model is
# a random tiny Llama written by make_tiny_llama.py (MODEL_DIR); MODEL=/path/to/checkpoint
# evaluates an existing HF checkpoint directory instead, and MODEL=smollm2 the default SmolLM2
# Q4_1 GGUF (both sides dequantise it to float32; the hf side then needs `pip install gguf` in
# VENV). Runs local-completions with tokenized_requests=False and True, then hf, and prints
# per-sample agreement (compare_lm_eval.py). Results land in OUT (default /tmp/lm-eval-out).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${VENV:-/tmp/clients-venv}
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/lm-eval-out}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
TASKS=${TASKS:-pagedserve_mc,pagedserve_gen}
mkdir -p "$OUT"
cd "$ROOT"  # the task YAMLs name their jsonl files relative to the repository root

MODEL=${MODEL:-}
if [[ -z $MODEL ]]; then
    MODEL=${MODEL_DIR:-$OUT/tiny-llama}
    [[ -f $MODEL/config.json ]] || "$PYTHON" "$HERE/make_tiny_llama.py" "$MODEL" >/dev/null
elif [[ $MODEL == smollm2 ]]; then
    MODEL=$("$PYTHON" -c 'from pagedserve.model_files import default_model; print(default_model())')
fi
if [[ $MODEL == *.gguf ]]; then
    # lm-eval's API models load their tokenizer with AutoTokenizer: give them a directory.
    TOKENIZER=$OUT/tokenizer-$(basename "$MODEL" .gguf)
    "$PYTHON" -c 'import sys; from pagedserve.tokenizer import get_tokenizer; get_tokenizer(sys.argv[1]).save_pretrained(sys.argv[2])' \
        "$MODEL" "$TOKENIZER" >/dev/null
    HF_ARGS="pretrained=$(dirname "$MODEL"),gguf_file=$(basename "$MODEL"),tokenizer=$TOKENIZER,dtype=float32"
else
    TOKENIZER=$MODEL
    HF_ARGS="pretrained=$MODEL,dtype=float32"
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# NOTE: keep the loopback connection away from any proxy set in the environment.
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

SERVER_PID=""
stop_server() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap stop_server EXIT

"$PYTHON" -m pagedserve.entrypoints.cli serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
    --served-model-name lm-eval-model --dtype float32 --max-model-len 1024 --seed 0 \
    --disable-log-requests >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 600); do
    curl -sf -o /dev/null "http://127.0.0.1:$PORT/health" && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died, see $OUT/server.log" >&2; exit 1; }
    sleep 1
done

common=(--tasks "$TASKS" --include_path "$HERE/lm_eval_tasks" --log_samples --seed 0)
for tokenized in False True; do
    echo "== local-completions, tokenized_requests=$tokenized"
    "$VENV/bin/lm_eval" --model local-completions \
        --model_args "model=lm-eval-model,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$TOKENIZER,tokenizer_backend=huggingface,tokenized_requests=$tokenized,num_concurrent=4,max_retries=1" \
        --output_path "$OUT/local-completions-tokenized$tokenized" "${common[@]}"
done
stop_server
# The "http" failures this check looks for are the server's: any non-2xx answer shows up here.
grep -E '" (4|5)[0-9][0-9] ' "$OUT/server.log" || echo "server answered every request with 2xx"

echo "== hf (transformers, float32)"
"$VENV/bin/lm_eval" --model hf --model_args "$HF_ARGS" --device cpu --batch_size 4 \
    --output_path "$OUT/hf" "${common[@]}"

"$VENV/bin/python" "$HERE/compare_lm_eval.py" "$OUT/hf" "$OUT/local-completions-tokenizedFalse" \
    "$OUT/local-completions-tokenizedTrue"
