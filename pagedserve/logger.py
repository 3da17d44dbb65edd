"""Log set-up shared by pagedserve's processes.

PAGEDSERVE_LOGGING_LEVEL (vLLM's VLLM_LOGGING_LEVEL; default INFO) sets the level in the CLI
and in every engine-core process, which inherit it through the environment.
"""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
LEVEL_VARIABLE = "PAGEDSERVE_LOGGING_LEVEL"


def configure_logging(label: str | None = None) -> None:
    """basicConfig at PAGEDSERVE_LOGGING_LEVEL; an unknown level logs a warning and uses INFO
    (an engine-core process must not die over its log level). `label` prefixes every line of
    the process (data-parallel engine cores: "engine 1")."""
    level = os.environ.get(LEVEL_VARIABLE, "INFO").upper()
    known = isinstance(logging.getLevelName(level), int)
    log_format = LOG_FORMAT if label is None else f"({label}) {LOG_FORMAT}"
    logging.basicConfig(level=level if known else "INFO", format=log_format)
    if not known:
        logging.getLogger(__name__).warning(
            "%s=%r is not a logging level (DEBUG, INFO, WARNING, ...); using INFO", LEVEL_VARIABLE, level
        )
