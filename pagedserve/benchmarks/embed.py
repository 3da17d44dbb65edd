"""Offline embedding throughput: `LLM.embed` vs the peer a sentence-transformers user runs.

The workload is `--num-sentences` synthetic sentences of mixed lengths (words drawn from the
model's WordPiece vocabulary, word counts log-uniform in [--min-words, --max-words], fixed
seed), truncated at the model's max_seq_length as sentence-transformers truncates. Peers
(`--peers`, several run in the same rounds):

- `sentence-transformers`: `SentenceTransformer.encode` (sorts by length, batches of 32);
- `transformers-sorted`: the same recipe in plain transformers: sentences sorted by length,
  padded batches of `--hf-batch-size`, mean pooling over the attention mask, L2 normalisation;
- `transformers`: the same batches in input order, as transformers' own batching (a
  feature-extraction pipeline with batch_size) pads them: every batch pads to its longest;
- `auto` (default): sentence-transformers when importable, else transformers-sorted;
- `vllm`: vLLM's CPU build, `LLM(model, runner="pooling").embed`, in its own virtual environment
  (`--vllm-python`), driven through benchmarks/peers/vllm_pooling.py (install instructions there):
  one LLM for the whole run, so its rounds alternate with ours like the in-process peers.

Every side counts tokenization. The vectors must agree (minimum cosine over all sentences),
and each side's useful FLOP/s (padding excluded) is reported against the machine's measured
GEMM rate. Against a length-sorted peer packing saves only that peer's padding, which the run
prints as the ceiling of what packing alone can gain.

Served (`--base-url URL`): the same sentences, cut into requests of `--sentences-per-request`
sentences (drawn per request, fixed seed), posted to URL/v1/embeddings by `--concurrency` clients
that each send their next request when the last one is answered. Reports sentences/s and the
request latency (p50, p99); `--save-embeddings` keeps the vectors (sentence order, .npy) so that two
servers' runs can be compared (benchmarks/peers/embed_serving.py runs pagedserve and vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# A run whose vectors disagree more than this measured something other than the same model.
MIN_AGREEING_COSINE = 0.999

# The vLLM peer: its driver in a source checkout, and the venv benchmarks/peers/vllm_cpu.sh makes.
VLLM_POOLING_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "vllm_pooling.py"
DEFAULT_VLLM_PYTHON = Path(
    os.environ.get("VENV", Path.home() / ".cache/pagedserve-peers/vllm-cpu/venv")
) / "bin" / "python"


@dataclass(frozen=True, slots=True)
class EmbedResult:
    name: str
    seconds: float
    embeddings: torch.Tensor  # [num_sentences, hidden], in sentence order

    def sentences_per_s(self) -> float:
        return len(self.embeddings) / self.seconds


def make_sentences(vocab: list[str], num_sentences: int, min_words: int, max_words: int, seed: int) -> list[str]:
    """Sentences of random vocabulary words; word counts are log-uniform, so most sentences are
    short and a few are long, as in retrieval corpora."""
    words = [w for w in vocab if w.isalpha() and w.islower() and len(w) >= 3]
    if not words:
        raise ValueError("the vocabulary has no plain lowercase words to build sentences from")
    rng = np.random.default_rng(seed)
    counts = np.exp(rng.uniform(np.log(min_words), np.log(max_words + 1), size=num_sentences)).astype(int)
    return [" ".join(rng.choice(words, size=int(n)).tolist()).capitalize() + "." for n in counts]


def _pagedserve_encoder(args: argparse.Namespace) -> tuple[Callable[[list[str]], torch.Tensor], Callable[[], None]]:
    """-> (encode, shutdown) over one LLM."""
    from pagedserve import LLM

    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
    )

    def encode(sentences: list[str]) -> torch.Tensor:
        outputs = llm.embed(sentences, truncate_prompt_tokens=-1, use_tqdm=False)
        return torch.tensor([o.outputs.embedding for o in outputs], dtype=torch.float32)

    return encode, llm.llm_engine.shutdown


def _sentence_transformers_encoder(args: argparse.Namespace) -> Callable[[list[str]], torch.Tensor] | None:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(args.model, device="cpu")

    def encode(sentences: list[str]) -> torch.Tensor:
        return model.encode(
            sentences,
            batch_size=args.hf_batch_size,
            normalize_embeddings=True,
            convert_to_tensor=True,
            show_progress_bar=False,
        ).to(torch.float32)

    return encode


def peer_batches(sentences: list[str], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    """Sentence indices per batch. Sorted: sentence-transformers' order, longest (in characters)
    first, so each batch pads to similar lengths; unsorted: input order."""
    order = list(range(len(sentences)))
    if sort_by_length:
        order.sort(key=lambda i: -len(sentences[i]))
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def _transformers_encoder(
    args: argparse.Namespace, max_length: int, sort_by_length: bool
) -> Callable[[list[str]], torch.Tensor]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, dtype=_torch_dtype(args.dtype)).eval()

    def encode(sentences: list[str]) -> torch.Tensor:
        out = torch.empty(len(sentences), model.config.hidden_size)
        with torch.inference_mode():
            for indices in peer_batches(sentences, args.hf_batch_size, sort_by_length):
                batch = tokenizer(
                    [sentences[i] for i in indices],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[indices] = F.normalize(mean.float(), dim=-1)
        return out

    return encode


class VllmPoolingPeer:
    """vLLM's `LLM(model, runner="pooling").embed` in a process of vLLM's own Python, loaded once;
    each `encode` is one job for benchmarks/peers/vllm_pooling.py's `worker` (sentences as a JSON
    line on its stdin; the vectors come back through an .npy file, the answer as a JSON line)."""

    def __init__(self, python: str, model: str, dtype: str, max_num_seqs: int, workdir: str) -> None:
        if not Path(python).is_file():
            raise FileNotFoundError(f"--vllm-python {python} does not exist; see {VLLM_POOLING_SCRIPT} to install vLLM")
        if not VLLM_POOLING_SCRIPT.is_file():
            raise FileNotFoundError(f"the vLLM peer needs a source checkout ({VLLM_POOLING_SCRIPT} is missing)")
        self.workdir = workdir
        self.log_path = os.path.join(workdir, "vllm.log")
        command = [python, str(VLLM_POOLING_SCRIPT), "worker", model, "--dtype", dtype]
        command += ["--threads", str(torch.get_num_threads()), "--max-num-seqs", str(max_num_seqs)]
        with open(self.log_path, "wb") as log:
            # cwd: nothing in the current directory may shadow vLLM's imports.
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=workdir
            )
        self.version = self._answer()["vllm"]

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the vLLM peer exited ({self.proc.poll()}); its log: {self.log_path}")
        return json.loads(line)

    def encode(self, sentences: list[str]) -> torch.Tensor:
        assert self.proc.stdin is not None
        out = os.path.join(self.workdir, "vectors.npy")
        self.proc.stdin.write(json.dumps({"sentences": sentences, "out": out}) + "\n")
        self.proc.stdin.flush()
        self._answer()
        return torch.from_numpy(np.load(out))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the worker's loop ends at EOF and vLLM shuts down
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


PEERS = ("auto", "sentence-transformers", "transformers-sorted", "transformers", "vllm")


def _peer_encoders(
    args: argparse.Namespace, max_length: int, closers: list[Callable[[], None]]
) -> dict[str, Callable[[list[str]], torch.Tensor]]:
    """The peers' encoders; what must be shut down afterwards goes to `closers`."""
    encoders: dict[str, Callable[[list[str]], torch.Tensor]] = {}
    for peer in args.peers:
        if peer == "vllm":
            workdir = tempfile.mkdtemp(prefix="pagedserve-vllm-peer-")
            vllm = VllmPoolingPeer(args.vllm_python, args.model, args.dtype, args.max_num_seqs, workdir)
            closers.append(vllm.close)
            print(f"vllm {vllm.version} (log: {vllm.log_path})")
            encoders["vllm"] = vllm.encode
            continue
        if peer in ("auto", "sentence-transformers"):
            encode = _sentence_transformers_encoder(args)
            if encode is not None:
                encoders["sentence-transformers"] = encode
                continue
            if peer == "sentence-transformers":
                raise ValueError("--peers sentence-transformers: sentence-transformers is not installed")
            peer = "transformers-sorted"
        encoders[peer] = _transformers_encoder(args, max_length, sort_by_length=peer == "transformers-sorted")
    return encoders


def padded_tokens(token_counts: list[int], sentences: list[str], batch_size: int, sort_by_length: bool) -> int:
    """Tokens a padded-batch peer computes: every batch padded to its longest sentence."""
    return sum(
        len(batch) * max(token_counts[i] for i in batch)
        for batch in peer_batches(sentences, batch_size, sort_by_length)
    )


def _peer_list(value: str) -> list[str]:
    peers = [p.strip() for p in value.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown or not peers:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    return peers


def time_encoders(
    encoders: dict[str, Callable[[list[str]], torch.Tensor]], sentences: list[str], repeats: int
) -> list[EmbedResult]:
    """Each encoder's best time over `repeats` rounds; the encoders alternate within a round, so
    a noisy neighbour on the machine slows both rather than one."""
    for encode in encoders.values():
        encode(sentences[:8])  # warm-up
    best: dict[str, tuple[float, torch.Tensor]] = {}
    for _ in range(repeats):
        for name, encode in encoders.items():
            start = time.perf_counter()
            embeddings = encode(sentences)
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, embeddings)
    return [EmbedResult(name, seconds, embeddings) for name, (seconds, embeddings) in best.items()]


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def useful_flops(model_config: object, token_counts: list[int]) -> float:
    """Encoder forward FLOPs of the unpadded prompts: 2·(matmul weights) per token plus
    bidirectional attention, 4·layers·hidden per (query, key) pair."""
    cfg = model_config.hf_config  # type: ignore[attr-defined]
    hidden, intermediate, layers = int(cfg.hidden_size), int(cfg.intermediate_size), int(cfg.num_hidden_layers)
    linear_params = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    tokens = sum(token_counts)
    pairs = sum(n * n for n in token_counts)
    return 2.0 * linear_params * tokens + 4.0 * layers * hidden * pairs


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None, help="embedding model directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--num-sentences", type=int, default=2000)
    parser.add_argument("--min-words", type=int, default=4)
    parser.add_argument("--max-words", type=int, default=160)
    parser.add_argument("--hf-batch-size", type=int, default=32, help="the peer's batch size (sentence-transformers: 32)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both engines)")
    parser.add_argument("--backend", choices=["pagedserve", "peer", "both"], default="both")
    parser.add_argument(
        "--peers", type=_peer_list, default=["auto"], help=f"comma-separated, from: {', '.join(PEERS)}"
    )
    parser.add_argument("--gemm-size", type=int, default=2048, help="matrix size of the GEMM-rate probe (0: skip)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (alternating engines); each reports its best")
    parser.add_argument("--vllm-python", default=str(DEFAULT_VLLM_PYTHON), help="vLLM's venv Python (--peers vllm)")
    served = parser.add_argument_group("served (--base-url)")
    served.add_argument("--base-url", default=None, help="post to URL/v1/embeddings instead of running LLM.embed")
    served.add_argument("--concurrency", type=int, default=64, help="clients, each with one request in flight")
    served.add_argument(
        "--sentences-per-request", type=int, nargs=2, default=[1, 4], metavar=("MIN", "MAX"), help="drawn per request"
    )
    served.add_argument("--encoding-format", choices=["float", "base64"], default="float")
    served.add_argument("--save-embeddings", default=None, help=".npy file for the served vectors")
    served.add_argument("--save-result", default=None, help="JSON file for the served figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from pagedserve.benchmarks.utils import measure_gemm_flops
    from pagedserve.config.model import ModelConfig
    from pagedserve.model_files import all_minilm_l6_v2
    from pagedserve.tokenizer import get_tokenizer

    logging.getLogger("pagedserve").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    args.model = args.model or all_minilm_l6_v2()
    model_config = ModelConfig(args.model, dtype=args.dtype)
    max_length = int(model_config.max_model_len)  # type: ignore[arg-type]
    tokenizer = get_tokenizer(args.model)
    # NOTE: in token-id order: a fast tokenizer's get_vocab() comes in a different order in every
    # process, and the served comparison's runs must post the same sentences.
    vocab = tokenizer.get_vocab()
    sentences = make_sentences(sorted(vocab, key=vocab.__getitem__), args.num_sentences, args.min_words, args.max_words, args.seed)
    token_counts = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
    print(
        f"model={args.model} dtype={model_config.torch_dtype} sentences={len(sentences)} "
        f"tokens={sum(token_counts)} (mean {np.mean(token_counts):.0f}, max {max(token_counts)}) "
        f"threads={torch.get_num_threads()}"
    )
    if args.base_url:
        return run_served(args, sentences)
    gemm_rate = measure_gemm_flops(model_config.torch_dtype, args.gemm_size) if args.gemm_size else None
    flops = useful_flops(model_config, token_counts)

    encoders: dict[str, Callable[[list[str]], torch.Tensor]] = {}
    closers: list[Callable[[], None]] = []
    try:
        if args.backend in ("pagedserve", "both"):
            encoders["pagedserve"], shutdown = _pagedserve_encoder(args)
            closers.append(shutdown)
        if args.backend in ("peer", "both"):
            encoders.update(_peer_encoders(args, max_length, closers))
        results = time_encoders(encoders, sentences, args.repeats)
    finally:
        for close in closers:
            close()
    for result in results:
        line = f"{result.name:<22} {result.seconds:8.2f} s  {result.sentences_per_s():8.1f} sentences/s"
        line += f"  {sum(token_counts) / result.seconds:9.0f} tok/s  {flops / result.seconds / 1e9:7.1f} useful GFLOP/s"
        if gemm_rate:
            line += f" ({flops / result.seconds / gemm_rate:.0%} of GEMM {gemm_rate / 1e9:.0f} GFLOP/s)"
        print(line)
    for result in results:
        print(f"{result.name:<22} first values {result.embeddings[0, :4].tolist()}")
    if len(results) < 2 or results[0].name != "pagedserve":
        return 0
    ours, status = results[0], 0
    for peer in results[1:]:
        line = f"sentences/s ratio pagedserve / {peer.name}: {ours.sentences_per_s() / peer.sentences_per_s():.2f}x"
        if peer.name == "vllm":  # packs like us: no padding to report
            print(line)
        else:
            sort_by_length = peer.name != "transformers"  # the others batch in sentence-transformers' order
            padded = padded_tokens(token_counts, sentences, args.hf_batch_size, sort_by_length) / sum(token_counts)
            line += f"  (its padding: {padded - 1:.1%} of the tokens"
            print(line + (f"; packing alone gains at most {padded:.2f}x)" if sort_by_length else ")"))
        status |= report_agreement(ours.embeddings, peer.embeddings, peer.name)
    return status


def report_agreement(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> int:
    """Prints the cosine between two runs' vectors, sentence by sentence. -> 1 if they disagree."""
    cosine = F.cosine_similarity(ours, theirs, dim=-1)
    print(f"agreement with {name}: cosine min {cosine.min().item():.6f}, mean {cosine.mean().item():.6f}")
    if cosine.min().item() < MIN_AGREEING_COSINE:
        print(f"error: the embeddings disagree with {name} (cosine below {MIN_AGREEING_COSINE})")
        return 1
    return 0


# ---------------------------------------------------------------- served


@dataclass(frozen=True, slots=True)
class ServedResult:
    seconds: float
    num_sentences: int
    latencies_s: list[float]  # one per request
    client_cpu_s: float  # this process's CPU time: the client shares the machine with the server
    embeddings: torch.Tensor  # [num_sentences, hidden], in sentence order

    def sentences_per_s(self) -> float:
        return self.num_sentences / self.seconds

    def latency_ms(self, q: float) -> float:
        from pagedserve.benchmarks.utils import percentile

        return 1e3 * percentile(self.latencies_s, q)

    def summary(self) -> str:
        return (
            f"{self.num_sentences} sentences in {len(self.latencies_s)} requests, {self.seconds:.2f} s: "
            f"{self.sentences_per_s():.1f} sentences/s, latency p50 {self.latency_ms(50):.0f} ms, "
            f"p99 {self.latency_ms(99):.0f} ms (client CPU {self.client_cpu_s:.1f} s)"
        )


def split_requests(num_sentences: int, min_per_request: int, max_per_request: int, seed: int) -> list[range]:
    """Consecutive sentence ranges, each of a size drawn uniformly in [min, max] (the last may be
    shorter)."""
    rng = np.random.default_rng(seed)
    ranges, start = [], 0
    while start < num_sentences:
        size = int(rng.integers(min_per_request, max_per_request + 1))
        ranges.append(range(start, min(start + size, num_sentences)))
        start += size
    return ranges


def decode_embedding(value: list[float] | str) -> np.ndarray:
    """One `data[i].embedding` of a /v1/embeddings response: floats, or base64 of little-endian
    float32 bytes."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


async def post_embeddings(
    base_url: str,
    sentences: list[str],
    requests: list[range],
    concurrency: int,
    encoding_format: str,
    model: str | None = None,
) -> ServedResult:
    """`concurrency` clients over one connection pool, each posting its next request as soon as
    the last is answered; every response's vectors land in sentence order."""
    import httpx

    vectors: list[np.ndarray | None] = [None] * len(sentences)
    latencies: list[float] = []
    next_request = iter(requests)
    url = base_url.rstrip("/") + "/v1/embeddings"

    async def client_loop(client: httpx.AsyncClient) -> None:
        for indices in next_request:  # one iterator shared by all: each request is sent once
            body: dict = {"input": [sentences[i] for i in indices], "encoding_format": encoding_format}
            if model is not None:
                body["model"] = model
            start = time.perf_counter()
            response = await client.post(url, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"POST {url}: {response.status_code} {response.text[:500]}")
            data = response.json()["data"]
            latencies.append(time.perf_counter() - start)
            for item in data:
                vectors[indices[item["index"]]] = decode_embedding(item["embedding"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=None, trust_env=False) as client:
        cpu_start, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    if any(v is None for v in vectors[: requests[-1].stop]):
        raise RuntimeError("the server answered fewer vectors than it was sent sentences")
    embeddings = torch.from_numpy(np.stack(vectors[: requests[-1].stop]))  # type: ignore[arg-type]
    return ServedResult(seconds, len(embeddings), latencies, cpu_s, embeddings)


def run_served(args: argparse.Namespace, sentences: list[str]) -> int:
    """The served benchmark against `args.base_url` (warm-up first: 2 requests per client)."""
    requests = split_requests(len(sentences), *args.sentences_per_request, seed=args.seed)
    warmup = split_requests(min(len(sentences), 2 * args.concurrency), 1, 1, seed=args.seed)
    asyncio.run(post_embeddings(args.base_url, sentences, warmup, args.concurrency, args.encoding_format))
    result = asyncio.run(
        post_embeddings(args.base_url, sentences, requests, args.concurrency, args.encoding_format)
    )
    print(f"{args.base_url} concurrency {args.concurrency} ({args.encoding_format}): {result.summary()}")
    print(f"first values {result.embeddings[0, :4].tolist()}")
    if args.save_embeddings:
        np.save(args.save_embeddings, result.embeddings.numpy())
    if args.save_result:
        Path(args.save_result).write_text(
            json.dumps(
                {
                    "seconds": result.seconds,
                    "num_sentences": result.num_sentences,
                    "num_requests": len(result.latencies_s),
                    "sentences_per_s": result.sentences_per_s(),
                    "p50_latency_ms": result.latency_ms(50),
                    "p99_latency_ms": result.latency_ms(99),
                    "client_cpu_s": result.client_cpu_s,
                    "concurrency": args.concurrency,
                    "encoding_format": args.encoding_format,
                },
                indent=2,
            )
        )
    return 0

if __name__ == "__main__":
    raise SystemExit(main(add_cli_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
