"""The C++ kernels live in pagedserve/kernels/csrc as real source files, not in Python strings."""

from __future__ import annotations

import re
from pathlib import Path

import pagedserve
from pagedserve.kernels.build import CSRC_DIR, read_sources

PACKAGE_DIR = Path(pagedserve.__file__).parent
CPP_MARKERS = re.compile(r"#include\s*[<\"]|TORCH_LIBRARY(_IMPL)?\(|\b__m(256|512)\b")


def test_no_python_module_holds_cpp_source() -> None:
    offenders = [str(p) for p in PACKAGE_DIR.rglob("*.py") if CPP_MARKERS.search(p.read_text())]
    assert offenders == []


def test_every_csrc_file_the_loaders_name_exists_and_its_includes_resolve() -> None:
    files = sorted(p.name for p in Path(CSRC_DIR).iterdir() if p.suffix in (".cpp", ".h"))
    assert {"cpu_math.h", "gguf_gemm.cpp", "cpu_fused.cpp", "cpu_gemm.cpp", "paged_attention.cpp"} <= set(files)
    texts = read_sources(*files)
    for name, text in texts.items():
        for header in re.findall(r'#include\s*"([^"]+)"', text):
            assert header in texts, f"{name} includes {header}, which is not in csrc"
