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
- `auto` (default): sentence-transformers when importable, else transformers-sorted.

Every side counts tokenization. The vectors must agree (minimum cosine over all sentences),
and each side's useful FLOP/s (padding excluded) is reported against the machine's measured
GEMM rate. Against a length-sorted peer packing saves only that peer's padding, which the run
prints as the ceiling of what packing alone can gain.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# A run whose vectors disagree more than this measured something other than the same model.
MIN_AGREEING_COSINE = 0.999


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
            sentences, batch_size=args.hf_batch_size, normalize_embeddings=True, convert_to_tensor=True
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


PEERS = ("auto", "sentence-transformers", "transformers-sorted", "transformers")


def _peer_encoders(args: argparse.Namespace, max_length: int) -> dict[str, Callable[[list[str]], torch.Tensor]]:
    encoders: dict[str, Callable[[list[str]], torch.Tensor]] = {}
    for peer in args.peers:
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
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from pagedserve.benchmarks._workload import measure_gemm_flops
    from pagedserve.config.model import ModelConfig
    from pagedserve.model_files import all_minilm_l6_v2
    from pagedserve.tokenizer import get_tokenizer

    logging.getLogger("pagedserve").setLevel(logging.WARNING)
    args.model = args.model or all_minilm_l6_v2()
    model_config = ModelConfig(args.model, dtype=args.dtype)
    max_length = int(model_config.max_model_len)  # type: ignore[arg-type]
    tokenizer = get_tokenizer(args.model)
    sentences = make_sentences(list(tokenizer.get_vocab()), args.num_sentences, args.min_words, args.max_words, args.seed)
    token_counts = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
    print(
        f"model={args.model} dtype={model_config.torch_dtype} sentences={len(sentences)} "
        f"tokens={sum(token_counts)} (mean {np.mean(token_counts):.0f}, max {max(token_counts)}) "
        f"threads={torch.get_num_threads()}"
    )
    gemm_rate = measure_gemm_flops(model_config.torch_dtype, args.gemm_size) if args.gemm_size else None
    flops = useful_flops(model_config, token_counts)

    encoders: dict[str, Callable[[list[str]], torch.Tensor]] = {}
    shutdown: Callable[[], None] | None = None
    try:
        if args.backend in ("pagedserve", "both"):
            encoders["pagedserve"], shutdown = _pagedserve_encoder(args)
        if args.backend in ("peer", "both"):
            encoders.update(_peer_encoders(args, max_length))
        results = time_encoders(encoders, sentences, args.repeats)
    finally:
        if shutdown is not None:
            shutdown()
    for result in results:
        line = f"{result.name:<22} {result.seconds:8.2f} s  {result.sentences_per_s():8.1f} sentences/s"
        line += f"  {sum(token_counts) / result.seconds:9.0f} tok/s  {flops / result.seconds / 1e9:7.1f} useful GFLOP/s"
        if gemm_rate:
            line += f" ({flops / result.seconds / gemm_rate:.0%} of GEMM {gemm_rate / 1e9:.0f} GFLOP/s)"
        print(line)
    if len(results) < 2 or results[0].name != "pagedserve":
        return 0
    ours, status = results[0], 0
    for peer in results[1:]:
        sort_by_length = peer.name != "transformers"  # the others batch in sentence-transformers' order
        padded = padded_tokens(token_counts, sentences, args.hf_batch_size, sort_by_length) / sum(token_counts)
        line = f"sentences/s ratio pagedserve / {peer.name}: {ours.sentences_per_s() / peer.sentences_per_s():.2f}x"
        line += f"  (its padding: {padded - 1:.1%} of the tokens"
        print(line + (f"; packing alone gains at most {padded:.2f}x)" if sort_by_length else ")"))
        cosine = F.cosine_similarity(ours.embeddings, peer.embeddings, dim=-1)
        print(f"agreement with {peer.name}: cosine min {cosine.min().item():.6f}, mean {cosine.mean().item():.6f}")
        if cosine.min().item() < MIN_AGREEING_COSINE:
            print(f"error: the embeddings disagree with {peer.name} (cosine below {MIN_AGREEING_COSINE})")
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main(add_cli_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
