"""`pagedserve serve MODEL --headless`: this host's data-parallel engine cores, without an API server.

On a second host of a data-parallel deployment, e.g. two engine cores per host:

    host A: pagedserve serve MODEL --data-parallel-size 4 --data-parallel-size-local 2 \\
                --data-parallel-address A_IP
    host B: pagedserve serve MODEL --data-parallel-size 4 --data-parallel-size-local 2 \\
                --data-parallel-start-rank 2 --data-parallel-address A_IP --headless

The engine cores connect to the API server's sockets (engine/utils.py: DPAddresses) and run until
this process gets SIGINT/SIGTERM or one of them dies.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import tempfile
import threading

from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.utils import CoreEngineProcManager, DPAddresses
from pagedserve.entrypoints.openai.cli_args import validate_parsed_serve_args

logger = logging.getLogger(__name__)


def run_headless(args: argparse.Namespace) -> int:
    """-> 0 after a signal, 1 if an engine core died."""
    validate_parsed_serve_args(args)
    config = EngineArgs.from_cli_args(args).create_engine_config()
    parallel_config = config.parallel_config
    if not parallel_config.data_parallel_size_local:
        raise ValueError(
            "--headless runs this host's engine cores: --data-parallel-size-local must be at least 1"
        )
    if not parallel_config.data_parallel_is_multihost:
        raise ValueError(
            "--headless serves an API server on another host: --data-parallel-size-local must be below "
            "--data-parallel-size (and --data-parallel-start-rank past the API server's engine cores)"
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ipc_dir = tempfile.mkdtemp(prefix="pagedserve-headless-")
    addresses = DPAddresses.make(config, ipc_dir)
    manager = CoreEngineProcManager(config, addresses)
    logger.info(
        "headless: engine cores %s of %d, connected to the API server at %s",
        list(parallel_config.data_parallel_local_ranks),
        parallel_config.data_parallel_size,
        addresses.input,
    )
    exit_code = 0
    try:
        while not stop.wait(1.0):
            dead = manager.dead_engines()
            if dead:
                logger.error("engine cores exited: %s", dead)
                exit_code = 1
                break
    finally:
        manager.shutdown()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return exit_code
