"""Data-parallel plumbing shared by the API server and `pagedserve serve --headless`: where the
sockets are, and the local engine-core processes."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

from pagedserve.config import EngineConfig
from pagedserve.process_utils import ChildProcess


@dataclass(frozen=True)
class DPAddresses:
    """ZMQ addresses of a data-parallel deployment. The API server binds `input` (ROUTER: one
    DEALER per engine core, identified by its index) and `output` (PULL); the coordinator binds
    `coordinator` (PULL, engines' load reports) and `publish` (PUB, read by the API server only).

    Engine cores on other hosts reach the first three at `--data-parallel-address`, ports
    `--data-parallel-rpc-port` + 0, 1 and 2; on one host every address is an ipc path."""

    input: str
    output: str
    coordinator: str
    publish: str

    @classmethod
    def make(cls, config: EngineConfig, ipc_dir: str) -> DPAddresses:
        parallel_config = config.parallel_config
        publish = f"ipc://{ipc_dir}/dp-publish"
        if not parallel_config.data_parallel_is_multihost:
            return cls(
                f"ipc://{ipc_dir}/dp-input", f"ipc://{ipc_dir}/dp-output", f"ipc://{ipc_dir}/dp-load", publish
            )
        host, port = parallel_config.data_parallel_address, parallel_config.data_parallel_rpc_port
        if ":" in host:
            host = f"[{host}]"
        return cls(f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}", f"tcp://{host}:{port + 2}", publish)


def engine_identity(index: int) -> bytes:
    """The ZMQ identity of engine core `index` on the API server's ROUTER socket."""
    return index.to_bytes(2, "little")


class CoreEngineProcManager:
    """Starts this host's engine cores (ranks `data_parallel_local_ranks`), each an engine-core
    process with its own executor and workers, connected to the API server's sockets."""

    def __init__(self, config: EngineConfig, addresses: DPAddresses) -> None:
        self.procs: dict[int, ChildProcess] = {}
        for index in config.parallel_config.data_parallel_local_ranks:
            engine_config = copy.deepcopy(config)
            engine_config.parallel_config.data_parallel_rank = index
            self.procs[index] = ChildProcess(
                "pagedserve.engine.core:run_engine_core",
                (engine_config, addresses.input, addresses.output, os.getpid(), index, addresses.coordinator),
                name=f"pagedserve-engine-core-{index}",
            )

    def dead_engines(self) -> dict[int, int | None]:
        """Local engine cores that exited, with their exit codes."""
        return {index: proc.exitcode for index, proc in self.procs.items() if not proc.is_alive()}

    def shutdown(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
