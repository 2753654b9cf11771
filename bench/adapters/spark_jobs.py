"""spark_bg jobs for the benchmark; the worker imports them by module path."""

from __future__ import annotations

import spark_bg
from adapters import record


class NoopJob(spark_bg.Job):
    async def run(self) -> None:
        record.mark()


class SyncNoopJob(spark_bg.Job):
    def run(self) -> None:
        record.mark()


class PickupJob(spark_bg.Job):
    def __init__(self, t_push: float) -> None:
        self.t_push = t_push

    async def run(self) -> None:
        record.pickup(self.t_push)
