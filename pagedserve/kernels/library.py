"""The C++ kernel library built from the sources in pagedserve/kernels/csrc.

One library holds every csrc kernel (GGUF block GEMM, the fused decode layer): one build on
first use (pagedserve.kernels.build; ~30-60 s with a progress message, then cached).
"""

from __future__ import annotations

from typing import Any

from pagedserve.kernels.build import load_op, read_sources

LIBRARY_NAME = "pagedserve_kernels"
CSRC_FILES = ("cpu_math.h", "gguf_gemm.h", "gguf_gemm.cpp", "decode_layer.cpp")


def load_csrc_op(namespace: str, op_name: str, *, switch: str, what: str) -> Any | None:
    """torch.ops.<namespace>.<op_name> from the csrc library, or None (see `load_op`)."""
    return load_op(namespace, op_name, LIBRARY_NAME, read_sources(*CSRC_FILES), switch=switch, what=what)
