"""What one engine step returns, and how it fails (shared by `core.py` and `async_step.py`)."""

from __future__ import annotations

from typing import NamedTuple

from server.engine.request import RequestOutput
from server.engine.stats import FinishedRequestStats, IterationStats, RoutingStats


class StepResult(NamedTuple):
    outputs: list[RequestOutput]
    stats: IterationStats
    finished: list[FinishedRequestStats]  # requests that ended this step (or were aborted since the last)
    routing: RoutingStats | None


class StepError(RuntimeError):
    """A step failed: `request_ids` are the requests it was running (every request when it
    failed while scheduling); `cause` is the exception."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(str(cause))
        self.request_ids = request_ids
        self.cause = cause
