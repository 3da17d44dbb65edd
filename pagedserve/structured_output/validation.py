"""Frontend validation of structured output constraints, by the engine's backend."""

from __future__ import annotations

from collections import OrderedDict

from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured_output.backend_types import StructuredOutputKey, get_structured_output_key

# Constraints already validated (a client sends the same schema again and again).
_MAX_VALIDATED = 1024
_validated: OrderedDict[tuple[str, StructuredOutputKey], None] = OrderedDict()


def validate_structured_outputs(params: StructuredOutputsParams, backend: str) -> None:
    """Raises ValueError naming the field when `backend` cannot compile the constraint."""
    cache_key = (backend, get_structured_output_key(params))
    if cache_key in _validated:
        _validated.move_to_end(cache_key)
        return
    if backend in ("auto", "xgrammar"):
        from pagedserve.structured_output.backend_xgrammar import validate_xgrammar_params

        validate_xgrammar_params(params)
    elif backend == "guidance":
        from pagedserve.structured_output.backend_guidance import validate_guidance_params

        validate_guidance_params(params)
    else:
        raise ValueError(f"unknown structured outputs backend {backend!r}")
    _validated[cache_key] = None
    if len(_validated) > _MAX_VALIDATED:
        _validated.popitem(last=False)
