"""Job state to JSON and back, exactly.

Accepted values, restored with their type:

- `None`, `bool`, `int`, finite `float`, `str`;
- `list` and `dict` with `str` keys, nested to any depth;
- `tuple`, `bytes`, timezone-aware `datetime.datetime`, `datetime.date`, `datetime.timedelta`,
  `uuid.UUID` and `decimal.Decimal`, stored as one-key objects such as `{"$uuid": "..."}`.

Everything else is rejected, subclasses included (a `str` enum would come back as a plain
`str`), and so are naive datetimes, NaN and infinities, strings with lone surrogates, and dict
keys that are not `str`. An aware datetime comes back with the same instant and UTC offset, as
a fixed-offset `timezone`: a `zoneinfo` zone name is not kept. A user
dict whose only key starts with `$` is wrapped as `{"$dict": {...}}` so it never reads as a tag.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson

from spark_bg.errors import JobStateError

__all__ = ["ACCEPTED_TYPES", "decode_value", "dumps", "encode_value", "loads"]

ACCEPTED_TYPES = (
    "None, bool, int, float (finite), str, list, dict (str keys), tuple, bytes, "
    "datetime (timezone-aware), date, timedelta, UUID, Decimal"
)

# orjson handles 64-bit integers natively; larger ones are stored as text.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class _RejectedError(Exception):
    def __init__(self, path: str, value: object, reason: str) -> None:
        self.path = path
        self.value = value
        self.reason = reason


def encode_value(value: Any, path: str = "") -> Any:
    """Convert `value` to plain JSON types, tagging the richer ones.

    Raises `_RejectedError` with the path of the first value that cannot round-trip.
    """
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_unicode(value, path)
        return value
    if kind is bool or value is None:
        return value
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            return value
        return {"$int": str(value)}
    if kind is float:
        if math.isfinite(value):
            return value
        raise _RejectedError(path, value, f"{value!r} has no JSON form")
    if kind is list:
        return [encode_value(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if kind is dict:
        encoded = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _RejectedError(
                    f"{path}[{key!r}]", key, "dict keys must be str, as JSON object keys are"
                )
            if not key.isascii():
                _check_unicode(key, f"{path}[{key!r}]")
            encoded[key] = encode_value(item, f"{path}[{key!r}]")
        if len(encoded) == 1 and next(iter(encoded)).startswith("$"):
            return {"$dict": encoded}
        return encoded
    encoder = _TAGGED_ENCODERS.get(kind)
    if encoder is not None:
        return encoder(value, path)
    raise _RejectedError(path, value, f"it is not one of the accepted types ({ACCEPTED_TYPES})")


def _check_unicode(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _RejectedError(
            path,
            value,
            f"it contains {value[exc.start]!r}, a lone surrogate that UTF-8 cannot encode",
        ) from None


def _encode_datetime(value: dt.datetime, path: str) -> Any:
    if value.tzinfo is None or value.utcoffset() is None:
        raise _RejectedError(
            path,
            value,
            "a naive datetime is ambiguous; attach a timezone, e.g. datetime.now(timezone.utc)",
        )
    return {"$datetime": value.isoformat()}


def _encode_tuple(value: tuple[Any, ...], path: str) -> Any:
    return {"$tuple": [encode_value(item, f"{path}[{index}]") for index, item in enumerate(value)]}


def _encode_decimal(value: Decimal, path: str) -> Any:
    if not value.is_finite():
        raise _RejectedError(path, value, f"{value!r} has no exact JSON form")
    return {"$decimal": str(value)}


_TAGGED_ENCODERS: dict[type, Callable[[Any, str], Any]] = {
    dt.datetime: _encode_datetime,
    dt.date: lambda value, path: {"$date": value.isoformat()},
    dt.timedelta: lambda value, path: {
        "$timedelta": [value.days, value.seconds, value.microseconds]
    },
    uuid.UUID: lambda value, path: {"$uuid": str(value)},
    Decimal: _encode_decimal,
    bytes: lambda value, path: {"$bytes": base64.b64encode(value).decode("ascii")},
    tuple: _encode_tuple,
}

_TAGGED_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$datetime": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$timedelta": lambda parts: dt.timedelta(
        days=parts[0], seconds=parts[1], microseconds=parts[2]
    ),
    "$uuid": uuid.UUID,
    "$decimal": Decimal,
    "$bytes": base64.b64decode,
    "$tuple": lambda items: tuple(decode_value(item) for item in items),
    "$int": int,
    "$dict": lambda inner: {key: decode_value(item) for key, item in inner.items()},
}


def decode_value(value: Any) -> Any:
    """Rebuild what `encode_value` produced."""
    kind = type(value)
    if kind is list:
        return [decode_value(item) for item in value]
    if kind is dict:
        if len(value) == 1:
            key = next(iter(value))
            decoder = _TAGGED_DECODERS.get(key)
            if decoder is not None:
                return decoder(value[key])
        return {key: decode_value(item) for key, item in value.items()}
    return value


def encode_state(job_class: str, state: dict[str, Any]) -> dict[str, Any]:
    """Encode a job's attributes, or raise `JobStateError` naming the first bad attribute."""
    encoded = {}
    for name, value in state.items():
        try:
            encoded[name] = encode_value(value, name)
        except _RejectedError as rejected:
            raise JobStateError(
                job_class, rejected.path, _type_name(rejected.value), rejected.reason
            ) from None
    return encoded


def _type_name(value: object) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def dumps(value: Any) -> bytes:
    """Serialize plain JSON types to UTF-8 bytes."""
    return orjson.dumps(value)


def loads(data: bytes | str) -> Any:
    """Parse JSON text; raises `orjson.JSONDecodeError` (a `ValueError`) on invalid input."""
    return orjson.loads(data)
