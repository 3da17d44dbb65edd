"""Structured outputs (constrained decoding): the engine core's manager and one module per backend."""

from pagedserve.structured_output.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager"]
