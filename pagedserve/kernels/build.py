"""Builds a C++ source into a torch op library once per (source, flags, torch, CPU) and loads it.

The library is cached under $PAGEDSERVE_CACHE_DIR (default ~/.cache/pagedserve) in a directory
keyed by a hash of the source, the flags, torch's version and the CPU's model and feature flags,
so later processes only load it (milliseconds) instead of compiling (~10-20 s).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_signature() -> str:
    """The CPU's model and feature flags: a -march=native build must not run on another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. "avx512f") for this CPU."""
    return any(flag in line.split() for line in cpu_signature().splitlines() if line.startswith("flags"))


# A kernel library's sources: one C++ text, or {file name: text} (*.cpp compiled, headers beside).
Sources = str | dict[str, str]


def _source_files(name: str, source: Sources) -> dict[str, str]:
    return {f"{name}.cpp": source} if isinstance(source, str) else source


def library_path(name: str, source: Sources) -> str:
    files = _source_files(name, source)
    key = "".join(f"{file}\0{text}" for file, text in sorted(files.items()))
    key = f"{key}{CFLAGS}{torch.__version__}{cpu_signature()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = os.environ.get("PAGEDSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagedserve"
    )
    return os.path.join(root, name, digest, f"{name}.so")


def _build(name: str, source: Sources, library: str) -> None:
    """Compiles `source`, loads it, and leaves the library at `library` for later processes."""
    from torch.utils.cpp_extension import load

    os.makedirs(os.path.dirname(library), exist_ok=True)
    # NOTE: every process builds in a directory of its own and renames the result into place.
    # torch's shared build directory has a lock file that a process killed mid-build leaves
    # behind, and every later process would wait on it forever.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(library)) as build_dir:
        compiled = []
        for file, text in _source_files(name, source).items():
            with open(os.path.join(build_dir, file), "w") as f:
                f.write(text)
            if file.endswith(".cpp"):
                compiled.append(os.path.join(build_dir, file))
        # NOTE: load(), not load_inline(): load_inline prepends torch/extension.h, which makes the
        # build ~4x slower (~35 s instead of ~10 s here).
        built = load(
            name,
            sources=compiled,
            extra_include_paths=[build_dir],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            is_python_module=False,
            verbose=False,
        )
        os.replace(built, library)


CSRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def read_sources(*filenames: str) -> dict[str, str]:
    """{file name: text} of kernel source files in pagedserve/kernels/csrc."""
    texts = {}
    for filename in filenames:
        with open(os.path.join(CSRC_DIR, filename)) as f:
            texts[filename] = f.read()
    return texts


def _registered_op(namespace: str, op_name: str) -> Any | None:
    try:
        return getattr(getattr(torch.ops, namespace), op_name)
    except (AttributeError, RuntimeError):
        return None


def load_op(namespace: str, op_name: str, name: str, source: Sources, *, switch: str, what: str) -> Any | None:
    """torch.ops.<namespace>.<op_name> from the library `name` built from `source`, or None.

    None when the environment variable `switch` is 0/false, or the library cannot be built or
    loaded here; the caller keeps a pure-torch fallback for that. `what` names the kernel in logs.
    """
    if os.environ.get(switch, "1").lower() in ("0", "false"):
        return None
    op = _registered_op(namespace, op_name)
    if op is None and load_op_library(name, source, what):
        op = _registered_op(namespace, op_name)
    return op


def load_op_library(name: str, source: Sources, what: str) -> bool:
    """Loads (building it first where needed) the op library `name`; False when it cannot be built."""
    library = library_path(name, source)
    start = time.perf_counter()
    try:
        if os.path.exists(library):
            torch.ops.load_library(library)
        elif shutil.which(os.environ.get("CXX", "c++")) is None:
            logger.info("no C++ compiler found; running without the %s", what)
            return False
        else:
            # NOTE: a warning, so that `pagedserve bench` (WARNING level) shows it too: the first
            # run on a machine otherwise sits silent for the length of the build.
            logger.warning("compiling the %s for this machine (once; up to a minute) ...", what)
            _build(name, source, library)
            logger.warning("compiled the %s in %.1f s (cached in %s)", what, time.perf_counter() - start, library)
    except Exception as exc:  # noqa: BLE001  (any build or load failure means: use the fallback)
        logger.warning("could not build the %s (%s); using the torch fallback", what, exc)
        return False
    return True
