"""Exceptions raised by spark_bg.

The tree::

    SparkError
    ├── ConfigurationError      an invalid queue URL, option or worker target
    ├── JobStateError           job state that cannot be stored as JSON exactly (TypeError too)
    ├── JobLoadError            a stored job that the worker cannot rebuild
    └── BackendError            the backend failed to store or hand out jobs

Two exceptions are raised by job code to steer the worker rather than to report a fault:
`RetryJob` asks for another attempt after a delay, and `CancelJob` fails the job at once.
"""

from __future__ import annotations

from datetime import timedelta


class SparkError(Exception):
    """Base class of every error raised by spark_bg."""


class ConfigurationError(SparkError):
    """An invalid queue URL, option or worker target."""


class JobStateError(SparkError, TypeError):
    """Job state that cannot be encoded as JSON and decoded back exactly.

    Raised by `push()` inside the caller, so a handler gets it before its response is sent.
    """

    def __init__(self, job_class: str, attribute: str, type_name: str, reason: str) -> None:
        self.job_class = job_class
        self.attribute = attribute
        self.type_name = type_name
        self.reason = reason
        super().__init__(
            f"cannot push {job_class}: attribute {attribute!r} has type {type_name}, {reason}"
        )


class JobLoadError(SparkError):
    """A stored job that the worker cannot rebuild: invalid JSON, unknown or disallowed class."""


class BackendError(SparkError):
    """The backend failed to store or hand out jobs."""


class RetryJob(Exception):  # noqa: N818 - raised by job code as a request, not a fault
    """Raise from `Job.run()` to run the job again after `delay`.

    The attempt counts toward the job's `max_attempts`; after the last one the job goes to
    the failed-job store like any other failure.
    """

    def __init__(self, delay: float | timedelta = 0.0, reason: str = "") -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if seconds < 0:
            raise ValueError(f"RetryJob delay must be 0 or more seconds, got {seconds}")
        self.delay_s = seconds
        self.reason = reason
        super().__init__(reason or f"retry requested in {seconds:g} s")


class CancelJob(Exception):  # noqa: N818 - raised by job code as a request, not a fault
    """Raise from `Job.run()` to fail the job at once, with no further attempts."""
