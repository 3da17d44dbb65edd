"""Writes a small random float32 Llama with SmolLM2's tokenizer as an HF checkpoint directory,
for client checks where pagedserve and transformers must score the very same weights.

    python benchmarks/clients/make_tiny_llama.py /tmp/tiny-llama

Runs in the project's environment (it needs pagedserve for SmolLM2's tokenizer); the directory
it writes loads in any transformers. Weights are drawn wider than Llama's default init so that
greedy choices sit far from ties (both engines compute in float32, but not bit-identically).
"""

from __future__ import annotations

import argparse

import torch
import transformers

from pagedserve.model_files import default_model
from pagedserve.tokenizer import get_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = get_tokenizer(default_model())
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(args.directory)
    tokenizer.save_pretrained(args.directory)
    print(args.directory)


if __name__ == "__main__":
    main()
