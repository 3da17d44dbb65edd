"""Ray helpers: the cluster and placement group the workers live in, and the actor that hosts a worker.

`ray` is an optional dependency (`pip install 'pagedserve[ray]'`); nothing here imports it until a
Ray executor is built.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import psutil

from pagedserve.config import EngineConfig, ParallelConfig

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

logger = logging.getLogger(__name__)

# CPUs each worker's placement-group bundle reserves (and the torch threads it may use).
CPUS_PER_WORKER_VARIABLE = "PAGEDSERVE_RAY_CPUS_PER_WORKER"
# PACK (default: as few nodes as possible), SPREAD, STRICT_PACK or STRICT_SPREAD.
PLACEMENT_STRATEGY_VARIABLE = "PAGEDSERVE_RAY_PLACEMENT_STRATEGY"
_PLACEMENT_TIMEOUT_S = 60.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ValueError("distributed_executor_backend='ray' needs Ray: pip install 'pagedserve[ray]'") from e
    return ray


def cpus_per_worker() -> float:
    return float(os.environ.get(CPUS_PER_WORKER_VARIABLE, "1"))


def initialize_ray_cluster(parallel_config: ParallelConfig) -> tuple[PlacementGroup, bool, bool]:
    """Connects to the cluster at RAY_ADDRESS, or starts a local one; then reserves one bundle
    per worker (or uses the placement group this process already runs in).

    -> (placement group, whether this call started Ray, whether it created the group)."""
    ray = import_ray()
    started_ray = False
    if not ray.is_initialized():
        # NOTE: no usage statistics leave the machine, and no dashboard is served.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = os.environ.get("RAY_ADDRESS") or None
        num_cpus = None
        if address is None:
            # "local": a new cluster (ray.init would otherwise join the last one `ray start`
            # left on this machine). It may run more workers than cores, as the multiproc
            # executor does.
            address = "local"
            num_cpus = max(os.cpu_count() or 1, int(parallel_config.world_size * cpus_per_worker() + 0.999))
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        started_ray = address == "local"
    current = ray.util.get_current_placement_group()
    if current is not None:
        if len(current.bundle_specs) < parallel_config.world_size:
            raise ValueError(
                f"the current Ray placement group has {len(current.bundle_specs)} bundles, "
                f"{parallel_config.world_size} workers need one each"
            )
        return current, started_ray, False
    bundles = [{"CPU": cpus_per_worker()} for _ in range(parallel_config.world_size)]
    strategy = os.environ.get(PLACEMENT_STRATEGY_VARIABLE, "PACK")
    placement_group = ray.util.placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([placement_group.ready()], timeout=_PLACEMENT_TIMEOUT_S)
    if not ready:
        ray.util.remove_placement_group(placement_group)
        raise ValueError(
            f"the Ray cluster cannot place {parallel_config.world_size} workers of {cpus_per_worker()} CPUs "
            f"({strategy}); it has {ray.available_resources()}"
        )
    return placement_group, started_ray, True


def interface_of(ip: str) -> str | None:
    """The network interface that holds `ip` on this host."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address == ip for address in addresses):
            return name
    return None


class RayWorkerWrapper:
    """One worker rank in a Ray actor. Steps arrive msgspec-encoded and only the output rank
    answers, as in the multiproc executor; the worker keeps its persistent batch between steps."""

    def get_node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def get_free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_worker(
        self,
        config: EngineConfig,
        rank: int,
        dist_init_method: str,
        heartbeat_address: str,
        num_workers_on_node: int,
        env: dict[str, str],
        node_ip: str | None,
    ) -> None:
        """`env`: the engine core's PAGEDSERVE_* settings. `node_ip`: set when the workers span
        several hosts: gloo then binds the interface that holds it (a host may have several,
        and its name may resolve to none of them)."""
        import torch

        from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
        from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder
        from pagedserve.executor.abstract import cpu_threads_per_worker
        from pagedserve.executor.heartbeat import start_heartbeat
        from pagedserve.logger import configure_logging
        from pagedserve.worker.worker import Worker, init_worker_distributed

        os.environ.update(env)
        configure_logging()
        if node_ip is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
            interface = interface_of(node_ip)
            if interface is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        start_heartbeat(heartbeat_address, rank)
        torch.set_num_threads(cpu_threads_per_worker(config, num_workers_on_node))
        init_worker_distributed(config, rank, dist_init_method)
        self.worker = Worker(config, rank)
        self.worker.load_model()
        self.is_output_rank = rank == config.parallel_config.output_rank
        self.step_decoder = MsgpackDecoder(SchedulerOutput)
        self.grammar_decoder = MsgpackDecoder(GrammarOutput | None)
        self.encoder = MsgpackEncoder()

    def execute_model(self, scheduler_output: bytes, grammar_output: bytes | None = None) -> bytes | None:
        """`grammar_output`: the step's encoded GrammarOutput (last pipeline stage, structured
        requests in the step), else None."""
        grammar = None if grammar_output is None else self.grammar_decoder.decode(grammar_output)
        output = self.worker.execute_model(self.step_decoder.decode(scheduler_output), grammar)
        return self.encoder.encode(output) if self.is_output_rank else None

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        return getattr(self.worker, method)(*args)
