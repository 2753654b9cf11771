"""Job classes for the tests, in an importable module as a worker would need them."""

from __future__ import annotations

from typing import Any

from spark_bg.job import Job


class StateJob(Job):
    """A job whose only state is `value`."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def run(self) -> None:
        pass


class InitRaisesJob(Job):
    """A job whose `__init__` raises, so a rebuild that called it would fail."""

    value: Any

    def __init__(self, value: Any) -> None:
        raise RuntimeError("InitRaisesJob.__init__ was called")

    def run(self) -> None:
        pass


class NotAJob:
    """A plain class, importable by name but not a `Job` subclass."""

    def run(self) -> None:
        pass


def not_a_job() -> None:
    """A plain function, importable by name but not a `Job` subclass."""


class RecordJob(Job):
    """Appends its `label` to `RecordJob.seen` when run, in the process that runs it."""

    seen: list[str] = []  # noqa: RUF012 - shared on purpose, read by the tests

    def __init__(self, label: str) -> None:
        self.label = label

    async def run(self) -> None:
        RecordJob.seen.append(self.label)


class ChildPushJob(Job):
    """Pushes one `RecordJob` from inside its own run, then optionally raises."""

    def __init__(self, label: str, fail: bool = False) -> None:
        self.label = label
        self.fail = fail

    async def run(self) -> None:
        from spark_bg import current_queue

        queue = current_queue()
        assert queue is not None, "a running job has a queue"
        queue.push(RecordJob(self.label))
        if self.fail:
            raise RuntimeError("ChildPushJob failed on purpose")
