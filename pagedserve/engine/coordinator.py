"""DPCoordinator: a small process between data-parallel engine cores and the API server.

Each engine core reports its load (waiting and running requests, KV-cache usage) every 100 ms
while it changes and at least every second; the coordinator publishes every engine's latest
load, and how many seconds ago it reported, to the API server, which routes each request to the
least loaded engine core. An engine core that stopped reporting is one the API server cannot
see die otherwise (it runs on another host): the report's age tells.

    engine core -> coordinator (PUSH -> PULL):  (engine_index, num_waiting, num_running, kv_cache_usage)
    coordinator -> API server  (PUB -> SUB):    [EngineLoad, ...] one per engine core, by index
"""

from __future__ import annotations

import time

import msgspec
import zmq

from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder

# Publish at most this often while loads change, and at least this often anyway.
PUBLISH_INTERVAL_S = 0.1
IDLE_PUBLISH_INTERVAL_S = 1.0


class EngineLoad(msgspec.Struct, array_like=True):
    num_waiting_reqs: int = 0
    num_running_reqs: int = 0
    kv_cache_usage: float = 0.0
    # Seconds since the engine core last reported (since the coordinator started, before that).
    report_age_s: float = 0.0


def run_coordinator(num_engines: int, engine_address: str, publish_address: str, parent_pid: int) -> None:
    """Entry point of the coordinator process."""
    from pagedserve.process_utils import set_parent_death_signal, watch_parent

    set_parent_death_signal()
    watch_parent(parent_pid)
    ctx = zmq.Context()
    reports = ctx.socket(zmq.PULL)
    reports.bind(engine_address)
    publish = ctx.socket(zmq.PUB)
    publish.bind(publish_address)
    decoder, encoder = MsgpackDecoder(), MsgpackEncoder()
    loads = [EngineLoad() for _ in range(num_engines)]
    last_report = [time.monotonic()] * num_engines
    changed, last_publish = True, 0.0
    while True:
        interval = PUBLISH_INTERVAL_S if changed else IDLE_PUBLISH_INTERVAL_S
        timeout_ms = max(0.0, last_publish + interval - time.monotonic()) * 1000
        if reports.poll(timeout_ms):
            index, num_waiting, num_running, kv_cache_usage = decoder.decode(reports.recv())
            last_report[index] = time.monotonic()
            load = loads[index]
            new = (num_waiting, num_running, kv_cache_usage)
            if new != (load.num_waiting_reqs, load.num_running_reqs, load.kv_cache_usage):
                load.num_waiting_reqs, load.num_running_reqs, load.kv_cache_usage = new
                changed = True
        now = time.monotonic()
        if now - last_publish < interval:
            continue
        for load, reported in zip(loads, last_report):
            load.report_age_s = now - reported
        publish.send(encoder.encode(loads))
        changed, last_publish = False, now
