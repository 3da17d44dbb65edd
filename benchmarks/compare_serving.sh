#!/usr/bin/env bash
# pagedserve vs llama.cpp's llama-server, same workload, same model weights, one server at a time.
#
#   benchmarks/peers/llama_cpp.sh all      # once: build llama-server, convert SmolLM2 to f32 GGUF
#   benchmarks/compare_serving.sh          # default: concurrency 16 and 64, rate inf and 4 req/s
#
# For each concurrency C: `pagedserve serve` with --max-num-seqs C, then llama-server with -np C
# (-t 2), each benchmarked by `pagedserve bench serve` with the same seed: NUM_PROMPTS random
# token-id prompts (input ~INPUT_LEN, output ~OUTPUT_LEN, lengths ±50%, ignore_eos, greedy),
# at every request rate in RATES. Both compute in float32: ours dequantises SmolLM2's Q4_1 GGUF to
# float32, llama.cpp serves an f32 GGUF converted from the same dequantised weights.
# Results (JSON) go to $OUT; the side-by-side tables are printed at the end.
#
# Environment: CONCURRENCY ("16 64"), RATES ("inf 4"), NUM_PROMPTS (128), INPUT_LEN (128),
# OUTPUT_LEN (128), MAX_MODEL_LEN (1024), OUT (./serving-results), PORT (8000), LLAMA_PORT (8081),
# THREADS (2: llama-server -t/-tb, and OMP_NUM_THREADS for pagedserve's engine), SKIP_LLAMA=1 to
# run ours only, SERVER_ARGS (extra `pagedserve serve` flags).
#
# NOTE: on a machine shared with other work, use THREADS=1. llama.cpp's threads meet at a spin
# barrier after every op; when another process holds one of the two cores, each barrier waits
# out a scheduler time slice (measured here under load: 1.1 decode tok/s with -t 2 against 16.6
# with -t 1 for one request). Both engines then get the same single thread.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CONCURRENCY=${CONCURRENCY:-"16 64"}
RATES=${RATES:-"inf 4"}
NUM_PROMPTS=${NUM_PROMPTS:-128}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-1024}
OUT=${OUT:-$PWD/serving-results}
PORT=${PORT:-8000}
LLAMA_PORT=${LLAMA_PORT:-8081}
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-2}
mkdir -p "$OUT"

SERVER_PID=""
stop_server() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

wait_healthy() {  # url, seconds
    local deadline=$((SECONDS + $2))
    until curl -sf -o /dev/null "$1/health"; do
        if ((SECONDS > deadline)) || ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server at $1 did not become healthy (log in $OUT)" >&2
            exit 1
        fi
        sleep 1
    done
}

bench() {  # label, base url, concurrency
    local label=$1 url=$2 c=$3 rate
    for rate in $RATES; do
        echo "== $label, concurrency $c, rate $rate"
        "$PYTHON" -m pagedserve.entrypoints.cli bench serve --backend openai --base-url "$url" \
            --label "$label" --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" \
            --output-len "$OUTPUT_LEN" --request-rate "$rate" --seed 0 \
            --save-result "$OUT/$label-c$c-r$rate.json"
    done
}

for c in $CONCURRENCY; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$THREADS "$PYTHON" -m pagedserve.entrypoints.cli serve --host 127.0.0.1 --port "$PORT" \
        --max-num-seqs "$c" --max-model-len "$MAX_MODEL_LEN" --dtype float32 \
        --disable-log-requests --disable-uvicorn-access-log ${SERVER_ARGS:-} \
        >"$OUT/pagedserve-c$c.log" 2>&1 &
    SERVER_PID=$!
    wait_healthy "http://127.0.0.1:$PORT" 600
    bench pagedserve "http://127.0.0.1:$PORT" "$c"
    stop_server

    if [[ ${SKIP_LLAMA:-0} != 1 ]]; then
        THREADS=$THREADS CTX_PER_SEQ=$MAX_MODEL_LEN "$HERE/peers/llama_cpp.sh" serve "$c" "$LLAMA_PORT" \
            >"$OUT/llama.cpp-c$c.log" 2>&1 &
        SERVER_PID=$!
        wait_healthy "http://127.0.0.1:$LLAMA_PORT" 600
        bench llama.cpp "http://127.0.0.1:$LLAMA_PORT" "$c"
        stop_server
    fi
done

for c in $CONCURRENCY; do
    for rate in $RATES; do
        echo
        echo "######## concurrency $c (--max-num-seqs / -np), request rate $rate, $THREADS thread(s)"
        files=("$OUT/pagedserve-c$c-r$rate.json")
        [[ ${SKIP_LLAMA:-0} == 1 ]] || files+=("$OUT/llama.cpp-c$c-r$rate.json")
        "$PYTHON" -m pagedserve.entrypoints.cli bench serve --compare "${files[@]}"
    done
done
