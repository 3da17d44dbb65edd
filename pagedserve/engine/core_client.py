"""Clients through which the frontend talks to the engine core.

`InprocClient` runs the EngineCore in the caller's process and steps it on demand (debugging,
tests). The multiprocess clients live next to it once the engine core has its own process.
"""

from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.engine import EngineCoreOutputs, EngineCoreRequest
from pagedserve.engine.core import EngineCore


class InprocClient:
    def __init__(self, config: EngineConfig) -> None:
        self.engine_core = EngineCore(config)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine_core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine_core.step()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine_core.shutdown()
