"""Job stores behind one interface, picked by URL.

- `redis://host:port/db` and `rediss://...`: Redis, for production and scale-out;
- `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`: one SQLite file, no server;
- `memory://`: in-process, for tests.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from spark_bg.backends.base import (
    Backend,
    Delivery,
    FailedJob,
    FailedStoreLimits,
    Message,
    QueueCounts,
)
from spark_bg.errors import ConfigurationError

__all__ = [
    "Backend",
    "Delivery",
    "FailedJob",
    "FailedStoreLimits",
    "Message",
    "QueueCounts",
    "from_url",
]

SCHEMES = ("redis", "rediss", "sqlite", "memory")


def from_url(url: str) -> Backend:
    """Build an unopened backend from `url`; raise `ConfigurationError` for an invalid one.

    The query string carries backend settings, for example
    `redis://127.0.0.1:6379/0?prefix=myapp` or `sqlite:///jobs.db?failed_max_count=500`.
    Unknown settings are rejected.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"invalid queue URL {url!r}: expected redis://host:port/db, "
            "sqlite:///path/to/file.db or memory://"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    if scheme in ("redis", "rediss"):
        from spark_bg.backends.redis import RedisBackend

        return RedisBackend.from_url(url, options)
    if scheme == "sqlite":
        from spark_bg.backends.sqlite import SQLiteBackend

        return SQLiteBackend.from_url(url, options)
    if scheme == "memory":
        from spark_bg.backends.memory import MemoryBackend

        return MemoryBackend.from_url(url, options)
    raise ConfigurationError(
        f"invalid queue URL {url!r}: unknown scheme {parts.scheme!r}, "
        f"expected one of {', '.join(SCHEMES)}"
    )


def failed_limits_from_options(url: str, options: dict[str, str]) -> FailedStoreLimits:
    """Pop the failed-store settings out of a URL's query options."""
    limits = FailedStoreLimits()
    for name, attribute, convert in (
        ("failed_max_count", "max_count", int),
        ("failed_max_age_s", "max_age_s", float),
    ):
        if name in options:
            raw = options.pop(name)
            try:
                setattr(limits, attribute, convert(raw))
            except ValueError:
                raise ConfigurationError(
                    f"invalid {name}={raw!r} in queue URL {url!r}: expected a number"
                ) from None
    return limits


def reject_unknown_options(url: str, options: dict[str, str], known: tuple[str, ...]) -> None:
    """Raise `ConfigurationError` if `options` contains a setting not in `known`."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigurationError(
            f"unknown setting {unknown[0]!r} in queue URL {url!r}; "
            f"known settings: {', '.join((*known, 'failed_max_count', 'failed_max_age_s'))}"
        )
