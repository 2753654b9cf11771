"""The `Job` base class, the registry of job classes and the envelope a job travels in.

A job's state is its instance attributes at push time (`vars(job)`). Its options (queue,
attempts, timeout, backoff) are class attributes, overridable per push; an instance attribute
with an option's name is rejected, so state and options never mix.

The worker rebuilds a job with `object.__new__` and the stored attributes, without calling
`__init__`. It only instantiates classes found in the registry that `Job.__init_subclass__` fills,
and only imports modules from the packages it was configured to load jobs from.
"""

from __future__ import annotations

import contextvars
import importlib
import os
import re
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from spark_bg import encoding
from spark_bg.errors import ConfigurationError, JobLoadError, JobStateError

__all__ = ["Job", "JobContext", "current_job"]

# Envelope format version, so that a reader can recognize a future layout.
ENVELOPE_VERSION = 1

_registry: dict[str, type[Job]] = {}


class Job:
    """Base class of background jobs: subclass it and write `run()`, sync or `async`.

    Class attributes set the defaults of the job's options; `push()` can override them.
    """

    queue: ClassVar[str] = "default"
    """Name of the queue the job is pushed to."""

    max_attempts: ClassVar[int] = 3
    """Runs allowed before the job goes to the failed-job store (1 means no retry)."""

    timeout_s: ClassVar[float | None] = None
    """Seconds a run may take before it is stopped and counted as a failed attempt."""

    backoff_base_s: ClassVar[float] = 1.0
    """First retry delay in seconds; each later attempt doubles it, with random jitter."""

    backoff_max_s: ClassVar[float] = 300.0
    """Upper bound in seconds of the retry delay."""

    fail_on: ClassVar[tuple[type[BaseException], ...]] = ()
    """Exception types that fail the job at once, with no further attempts."""

    run_in_process: ClassVar[bool] = False
    """Run a sync job in a child process, which is killed when `timeout_s` passes."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _registry[class_path(cls)] = cls

    def run(self) -> Awaitable[None] | None:
        """Do the job's work; override it with a plain or an `async` method."""
        raise NotImplementedError(f"{type(self).__qualname__} must define run()")

    def __repr__(self) -> str:
        state = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__qualname__}({state})"


OPTION_NAMES = frozenset(
    {
        "queue",
        "max_attempts",
        "timeout_s",
        "backoff_base_s",
        "backoff_max_s",
        "fail_on",
        "run_in_process",
    }
)


_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


# Queue names already checked, so that a push skips the pattern match for them. Its size is
# capped because an app may derive queue names from data.
_checked_queue_names: set[str] = set()
_CHECKED_QUEUE_NAMES_MAX = 1024


def check_queue_name(name: str) -> str:
    """Return `name` if it can be a queue name, else raise `ConfigurationError`."""
    # The type check comes first, because an unhashable value would make the lookup raise.
    if isinstance(name, str) and name in _checked_queue_names:
        return name
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        raise ConfigurationError(
            f"invalid queue name {name!r}: use 1 to 200 letters, digits, '_', '.', ':' or '-'"
        )
    if len(_checked_queue_names) < _CHECKED_QUEUE_NAMES_MAX:
        _checked_queue_names.add(name)
    return name


def class_path(cls: type) -> str:
    """Return the `module:QualName` a job class is stored under."""
    return f"{cls.__module__}:{cls.__qualname__}"


def check_importable(cls: type[Job]) -> None:
    """Reject job classes that a worker process could not find by name."""
    if cls.__module__ == "__main__":
        raise JobStateError(
            class_path(cls),
            "<class>",
            "type",
            "a job class defined in __main__ cannot be imported by the worker; "
            "move it to an importable module",
        )
    if "<locals>" in cls.__qualname__:
        raise JobStateError(
            class_path(cls),
            "<class>",
            "type",
            "a job class defined inside a function cannot be imported by the worker; "
            "define it at module level",
        )
    if cls.run is Job.run:
        raise JobStateError(
            class_path(cls), "run", "function", "the job class does not define run()"
        )


@dataclass(frozen=True, slots=True)
class JobContext:
    """Facts about the job the current task is running: its id, queue and attempt."""

    id: str
    queue: str
    attempt: int
    max_attempts: int
    enqueued_at: float


_current_job: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "spark_bg_current_job", default=None
)


def current_job() -> JobContext | None:
    """Return the context of the job being run, or `None` outside a job."""
    return _current_job.get()


_IDS_PER_READ = 64
_unused_ids: list[str] = []


def new_job_id() -> str:
    """Return a new job id: 128 random bits from `os.urandom`, in hex (32 characters).

    The random bytes are read for 64 ids at a time, which saves a system call per id.
    `list.pop` hands each id out once across threads, and a forked child drops the ids its
    parent read ahead.
    """
    try:
        return _unused_ids.pop()
    except IndexError:
        block = os.urandom(16 * _IDS_PER_READ).hex()
        _unused_ids.extend(block[start : start + 32] for start in range(32, len(block), 32))
        return block[:32]


os.register_at_fork(after_in_child=_unused_ids.clear)


# Job classes that passed `check_importable`, with the path they are stored under.
_checked_classes: dict[type, str] = {}


def checked_class_path(job: Job) -> str:
    """Return the stored path of `job`'s class after checking once that a worker can load it."""
    cls = type(job)
    path = _checked_classes.get(cls)
    if path is None:
        if not isinstance(job, Job):
            raise TypeError(
                f"push() takes a spark_bg.Job instance, got {cls.__qualname__}; "
                "subclass spark_bg.Job and define run()"
            )
        check_importable(cls)
        path = _checked_classes[cls] = class_path(cls)
    return path


def build_envelope(
    job: Job,
    job_id: str,
    queue: str | None = None,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Validate `job` and return the JSON-ready envelope that the backend stores."""
    path = checked_class_path(job)
    cls = type(job)
    state = vars(job)
    if not state:
        state = {}
    else:
        if not OPTION_NAMES.isdisjoint(state):
            name = min(OPTION_NAMES.intersection(state))
            raise JobStateError(
                path,
                name,
                type(state[name]).__qualname__,
                f"{name!r} is a job option: set it as a class attribute or pass "
                f"push(..., {name}=...), and rename the state attribute",
            )
        state = encoding.encode_state(path, state)
    if max_attempts is None:
        max_attempts = cls.max_attempts
    if max_attempts < 1:
        raise ConfigurationError(f"max_attempts must be 1 or more, got {max_attempts} for {path}")
    envelope: dict[str, Any] = {
        "v": ENVELOPE_VERSION,
        "id": job_id,
        "class": path,
        "state": state,
        "queue": check_queue_name(cls.queue if queue is None else queue),
        "attempt": 1,
        "max_attempts": max_attempts,
        "enqueued_at": time.time(),
    }
    if timeout_s is None:
        timeout_s = cls.timeout_s
    if timeout_s is not None:
        envelope["timeout_s"] = timeout_s
    return envelope


class JobLoader:
    """Find job classes by their stored `module:QualName`, within allowed packages only.

    A name already in the registry is used as is. Otherwise the module is imported only if it
    lies in one of `packages` (a package name covers its submodules); a name that still is not
    a registered `Job` subclass is rejected. No other object named by a payload is ever called.
    """

    def __init__(self, packages: Iterable[str] = ()) -> None:
        self.packages = tuple(packages)

    def allows(self, module: str) -> bool:
        """Return whether `module` lies in one of the allowed packages."""
        return any(module == pkg or module.startswith(pkg + ".") for pkg in self.packages)

    def load_class(self, path: str) -> type[Job]:
        """Return the registered job class stored as `path`, or raise `JobLoadError`."""
        cls = _registry.get(path)
        if cls is not None:
            return cls
        module, sep, qualname = path.partition(":")
        if not sep or not module or not qualname:
            raise JobLoadError(f"invalid job class name {path!r}: expected 'module:QualName'")
        if not self.allows(module):
            raise JobLoadError(
                f"job class {path!r} is not registered and module {module!r} is outside the "
                f"packages jobs are loaded from ({', '.join(self.packages) or 'none'}); "
                "add its package with --jobs-from"
            )
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise JobLoadError(f"cannot import module {module!r} of job {path!r}: {exc}") from exc
        cls = _registry.get(path)
        if cls is None:
            raise JobLoadError(
                f"{path!r} does not name a spark_bg.Job subclass defined in module {module!r}"
            )
        return cls

    def rebuild(self, envelope: dict[str, Any]) -> Job:
        """Instantiate the stored job without calling `__init__`."""
        cls = self.load_class(envelope["class"])
        job = object.__new__(cls)
        job.__dict__.update(encoding.decode_value(envelope["state"]))
        return job


def parse_envelope(payload: bytes) -> dict[str, Any]:
    """Parse a stored payload, raising `JobLoadError` for anything that is not an envelope."""
    try:
        envelope = encoding.loads(payload)
    except ValueError as exc:
        raise JobLoadError(f"payload is not valid JSON: {exc}") from exc
    if (
        not isinstance(envelope, dict)
        or not isinstance(envelope.get("class"), str)
        or not isinstance(envelope.get("state"), dict)
        or not isinstance(envelope.get("id"), str)
    ):
        raise JobLoadError("payload is not a spark_bg job envelope (missing id, class or state)")
    return envelope
