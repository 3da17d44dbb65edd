"""Workers as Ray actors, one per rank, placed by a Ray placement group anywhere in the cluster.

The engine core (the Ray driver) sends each step's SchedulerOutput msgspec-encoded, as bytes, to
every actor; actors run their steps in submission order (one call at a time), so up to
`max_concurrent_batches` steps may be in flight: pipeline stages overlap. Only the output rank
answers. A step with structured requests carries its grammar bitmask (GrammarOutput, msgspec-
encoded too) to the ranks of the last pipeline stage, the only ones that sample; a bitmask
deferred by async scheduling holds the step back until the engine core builds it. Tensor and pipeline parallelism run over gloo among the actors, at the address of rank
0's node as Ray reports it.

Dead workers: Ray fails the calls of an actor whose process died; a heartbeat connection from
every actor (executor/heartbeat.py) also catches a node that vanished, in seconds instead of
Ray's health-check timeout. Either way a waiting step raises WorkerDiedError and the engine core
fails with EngineDeadError, as with the multiproc executor.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec
from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder
from pagedserve.executor.abstract import Executor, WorkerDiedError, merge_kv_cache_groups
from pagedserve.executor.heartbeat import HeartbeatMonitor
from pagedserve.executor.ray_utils import (
    RayWorkerWrapper,
    cpus_per_worker,
    import_ray,
    initialize_ray_cluster,
)
from pagedserve.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)

_POLL_S = 0.2
_STARTUP_TIMEOUT_S = 600.0


class _RayStepFuture:
    """A step in flight: every actor's call; the result is the output rank's answer. `refs` is
    None until a step that waits for its deferred bitmask is submitted."""

    def __init__(self, executor: RayDistributedExecutor, refs: list[Any] | None) -> None:
        self._executor = executor
        self.refs = refs

    def result(self) -> ModelRunnerOutput:
        if self.refs is None:
            raise RuntimeError("the step waits for a grammar bitmask that was never built")
        outputs = self._executor._wait(self.refs)
        return self._executor.output_decoder.decode(outputs[self._executor.output_rank])


class RayDistributedExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.ray = ray = import_ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        parallel_config = config.parallel_config
        self.world_size = parallel_config.world_size
        self.output_rank = parallel_config.output_rank
        self.encoder = MsgpackEncoder()
        self.output_decoder = MsgpackDecoder(ModelRunnerOutput)
        self._closed = False
        self.workers: list[Any] = []
        self.monitor: HeartbeatMonitor | None = None
        self.placement_group, self._started_ray, self._created_placement_group = initialize_ray_cluster(
            parallel_config
        )
        try:
            actor_class = ray.remote(RayWorkerWrapper)
            self.workers = actors = [
                actor_class.options(
                    num_cpus=cpus_per_worker(),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=bundle
                    ),
                ).remote()
                for bundle in range(self.world_size)
            ]
            driver_ip = ray.util.get_node_ip_address()
            ips = self._wait([actor.get_node_ip.remote() for actor in actors], _STARTUP_TIMEOUT_S)
            # Ranks in node order, the driver's node first: a TP group (consecutive ranks) stays
            # on one node where it fits.
            order = sorted(range(self.world_size), key=lambda i: (ips[i] != driver_ip, ips[i], i))
            self.workers = [actors[i] for i in order]
            ips = [ips[i] for i in order]
            multi_node = len(set(ips)) > 1
            port = self._wait([self.workers[0].get_free_port.remote()])[0]
            dist_init_method = f"tcp://{ips[0] if multi_node else '127.0.0.1'}:{port}"
            self.monitor = HeartbeatMonitor(driver_ip if multi_node or driver_ip != ips[0] else "127.0.0.1")
            workers_per_node = Counter(ips)
            env = {k: v for k, v in os.environ.items() if k.startswith("PAGEDSERVE_")}
            self._wait(
                [
                    worker.init_worker.remote(
                        config,
                        rank,
                        dist_init_method,
                        self.monitor.address,
                        workers_per_node[ip],
                        env,
                        ip if multi_node else None,
                    )
                    for rank, (worker, ip) in enumerate(zip(self.workers, ips))
                ],
                _STARTUP_TIMEOUT_S,
            )
            self.monitor.enforce_silence = True
            logger.info(
                "Ray executor: %d workers on %d node(s) (%s)",
                self.world_size,
                len(workers_per_node),
                ", ".join(f"{ip}: {n}" for ip, n in workers_per_node.items()),
            )
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, refs: list[Any], timeout_s: float | None = None) -> list[Any]:
        """Every call's result, in order. Fails fast: a failed call, a dead actor or a silent
        heartbeat raises at once instead of waiting for ranks that may block forever in a
        collective with the dead one."""
        ray = self.ray
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S, fetch_local=False)
            if self.monitor is not None:
                # First: a rank's collective fails when its peer dies; name the dead one.
                self.monitor.check()
            for ref in ready:
                self._get(ref)  # raises if that call failed
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Ray workers did not answer in {timeout_s:.0f} s")
        return [self._get(ref) for ref in refs]

    def _get(self, ref: Any) -> Any:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayActorError as e:
            raise WorkerDiedError(f"a Ray worker died: {e}") from e
        except RayTaskError as e:
            raise RuntimeError(f"a Ray worker failed: {e}") from e

    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return self._wait([worker.call.remote(method, args) for worker in self.workers])

    def determine_num_kv_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_kv_blocks"))

    def get_kv_cache_groups(self) -> list[KVCacheGroupSpec]:
        return merge_kv_cache_groups(self.collective_rpc("get_kv_cache_groups"))

    def initialize(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", (num_blocks,))

    def execute_model(
        self,
        scheduler_output: SchedulerOutput,
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None,
    ) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output, grammar_output).result()

    def execute_model_async(
        self,
        scheduler_output: SchedulerOutput,
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None,
    ) -> Future[ModelRunnerOutput]:
        """NOTE: a deferred bitmask (async scheduling) holds the whole step back until the engine
        core sets it, in its own thread, before it schedules the next step: steps reach the actors
        in order, and that step's forward pass does not overlap the collection of the one before
        (as with the multiproc executor, whose ranks read the bitmask before the forward pass)."""
        payload = self.encoder.encode(scheduler_output)
        if not scheduler_output.structured_output_request_ids:
            return _RayStepFuture(self, self._submit(payload, None))  # type: ignore[return-value]
        if isinstance(grammar_output, Future):
            step = _RayStepFuture(self, None)

            def submit(done: Future[GrammarOutput | None]) -> None:
                step.refs = self._submit(payload, self.encoder.encode(done.result()))

            grammar_output.add_done_callback(submit)
            return step  # type: ignore[return-value]
        return _RayStepFuture(self, self._submit(payload, self.encoder.encode(grammar_output)))  # type: ignore[return-value]

    def _submit(self, payload: bytes, grammar_payload: bytes | None) -> list[Any]:
        """One call per actor; the bitmask goes to the last pipeline stage's ranks only."""
        output_rank = self.output_rank
        return [
            worker.execute_model.remote(payload, grammar_payload if rank >= output_rank else None)
            for rank, worker in enumerate(self.workers)
        ]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self.ray
        if self.monitor is not None:
            self.monitor.close()
        for worker in self.workers:
            try:
                ray.kill(worker)
            except Exception:  # already gone
                pass
        if self._created_placement_group:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception:
                pass
        if self._started_ray:
            ray.shutdown()  # stops the local cluster this executor started
