"""Errors the frontend raises to callers."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine-core process (or one of its workers) died; no request can complete.

    Raised to every pending and future request within seconds of the death, never a hang.
    """

    def __init__(self, message: str = "the engine core died; see the engine's log for the cause") -> None:
        super().__init__(message)


class EngineGenerateError(RuntimeError):
    """One request failed inside the engine; the engine itself keeps serving others."""
