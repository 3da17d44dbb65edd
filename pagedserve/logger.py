"""Log set-up shared by pagedserve's processes.

PAGEDSERVE_LOGGING_LEVEL (vLLM's VLLM_LOGGING_LEVEL; default INFO) sets the level in the CLI
and in every engine-core process, which inherit it through the environment.
"""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
LEVEL_VARIABLE = "PAGEDSERVE_LOGGING_LEVEL"


def configure_logging() -> None:
    level = os.environ.get(LEVEL_VARIABLE, "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(
            f"PAGEDSERVE_LOGGING_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ...)"
        )
    logging.basicConfig(level=level, format=LOG_FORMAT)
