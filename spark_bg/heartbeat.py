"""The worker's heartbeat: a thread that renews leases and recovers jobs of dead workers.

It runs its own event loop with its own backend connection, so it keeps going while job code
holds the worker's loop or a CPU-bound sync job holds the GIL for long stretches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from typing import TYPE_CHECKING

from spark_bg.errors import BackendError

if TYPE_CHECKING:
    from spark_bg.worker import Worker

__all__ = ["Heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """A thread that renews the worker's leases and recovers jobs of dead workers."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.backend = worker.backend.clone()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="spark-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        worker = self.worker
        settings = worker.settings
        renew_every_s = settings.lease_s / 3
        next_sweep = time.monotonic() + random.uniform(0, settings.sweep_interval_s)
        opened = False
        failures = 0
        while not self._stop.is_set():
            try:
                if not opened:
                    await self.backend.open()
                    opened = True
                held = list(worker.held.values())
                if held:
                    lost = await self.backend.renew(worker.worker_id, held, settings.lease_s)
                    for job_id in lost:
                        # A job settled meanwhile (done, retried or failed) is not lost.
                        if job_id in worker.held and job_id not in worker._settling:
                            logger.warning(
                                "job %s: lease lost by worker %s; another worker may run it",
                                job_id,
                                worker.worker_id,
                            )
                if time.monotonic() >= next_sweep:
                    moved = await self.backend.recover(settings.queues, settings.max_deliveries)
                    for job_id in moved:
                        logger.warning(
                            "job %s: lease expired, recovered from a dead worker", job_id
                        )
                    next_sweep = time.monotonic() + settings.sweep_interval_s
                failures = 0
            except BackendError as exc:
                failures += 1
                logger.warning("heartbeat failed (attempt %d): %s", failures, exc)
            await asyncio.to_thread(self._stop.wait, renew_every_s if not failures else 1.0)
        if opened:
            with contextlib.suppress(Exception):
                await self.backend.close()
