"""IntermediateTensors: what one pipeline stage hands the next (vLLM keeps it in the same place)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class IntermediateTensors:
    """A non-last pipeline stage's output and the next stage's input: the residual stream of
    every token of the step, by name (Llama: "hidden_states" and "residual", [num_tokens, hidden])."""

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]
