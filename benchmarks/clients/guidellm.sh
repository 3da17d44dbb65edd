#!/usr/bin/env bash
# GuideLLM (its OpenAI HTTP backend, synthetic prompts) against `pagedserve serve`: a short run
# over /v1/completions and one over /v1/chat/completions, both streamed. The check is that every
# request succeeds (a non-2xx answer is a server bug) and that GuideLLM's token counts match.
#
#   python -m venv /tmp/guidellm-venv
#   /tmp/guidellm-venv/bin/pip install torch==2.13.0   # CPU build first, else pip pulls CUDA's
#   /tmp/guidellm-venv/bin/pip install guidellm==0.8.1
#   benchmarks/clients/guidellm.sh                       # from the repository root
#
# Environment: VENV (/tmp/guidellm-venv), PYTHON (python, runs pagedserve), MODEL (default:
# SmolLM2's GGUF; a checkpoint directory also works), REQUESTS (16), STREAMS (4 concurrent),
# PROMPT_TOKENS (128), OUTPUT_TOKENS (32), OUT (/tmp/guidellm-out).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-/tmp/guidellm-venv}
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/guidellm-out}
REQUESTS=${REQUESTS:-16}
STREAMS=${STREAMS:-4}
PROMPT_TOKENS=${PROMPT_TOKENS:-128}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-32}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
MODEL=${MODEL:-$("$PYTHON" -c 'from pagedserve.model_files import default_model; print(default_model())')}
mkdir -p "$OUT"
cd "$HERE/../.."

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

# GuideLLM loads its tokenizer with AutoTokenizer(model): give it a directory.
TOKENIZER=$OUT/tokenizer
"$PYTHON" -c 'import sys; from pagedserve.tokenizer import get_tokenizer; get_tokenizer(sys.argv[1]).save_pretrained(sys.argv[2])' \
    "$MODEL" "$TOKENIZER" >/dev/null

SERVER_PID=""
stop_server() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap stop_server EXIT

"$PYTHON" -m pagedserve.entrypoints.cli serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
    --served-model-name guidellm-model --dtype float32 --max-model-len 1024 --max-num-seqs "$STREAMS" \
    --disable-log-requests >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 600); do
    curl -sf -o /dev/null "http://127.0.0.1:$PORT/health" && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died, see $OUT/server.log" >&2; exit 1; }
    sleep 1
done

for route in /v1/completions /v1/chat/completions; do
    name=$(echo "${route#/v1/}" | tr / -)  # completions, chat-completions
    echo "== guidellm, $route"
    "$VENV/bin/guidellm" run \
        --backend "kind=openai_http,target=http://127.0.0.1:$PORT,model=guidellm-model,request_format=$route" \
        --profile "kind=concurrent,streams=$STREAMS" \
        --constraint "kind=max_requests,count=$REQUESTS" \
        --tokenizer "kind=huggingface_auto,model=$TOKENIZER" \
        --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
        --output "kind=json,path=$OUT/guidellm-$name.json" --output kind=console \
        --disable-console-interactive
done
stop_server
grep -E '" (4|5)[0-9][0-9] ' "$OUT/server.log" || echo "server answered every request with 2xx"
