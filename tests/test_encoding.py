"""Job state encoding, the envelope and `JobLoader`, through the path a pushed job takes.

Each round trip builds the envelope, serializes it to bytes, parses it back and rebuilds the
job with `JobLoader`, as the worker does.
"""

from __future__ import annotations

import collections
import enum
import importlib.util
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import pytest

from spark_bg import encoding
from spark_bg.errors import ConfigurationError, JobLoadError, JobStateError
from spark_bg.job import Job, JobLoader, build_envelope, new_job_id, parse_envelope
from tests.jobs import InitRaisesJob, StateJob

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_JOB_PATH = "tests.jobs:StateJob"
LOADER = JobLoader(packages=("tests",))


def round_trip(value: Any) -> Any:
    """Push `value` as a job's state through the envelope and return what the worker gets."""
    envelope = build_envelope(StateJob(value), uuid.uuid4().hex)
    payload = encoding.dumps(envelope)
    rebuilt = LOADER.rebuild(parse_envelope(payload))
    assert type(rebuilt) is StateJob
    return rebuilt.value


def assert_identical(expected: Any, actual: Any, path: str = "value") -> None:
    """Assert that `actual` equals `expected` with the same type at every level."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} is not {type(expected)}"

    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length differs"
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            assert_identical(want, got, f"{path}[{index}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys differ"
        for key, want in expected.items():
            assert_identical(want, actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, datetime):
        assert actual == expected, f"{path}: instant differs"
        assert actual.utcoffset() == expected.utcoffset(), f"{path}: UTC offset differs"
    elif isinstance(expected, (Decimal, float)):
        # repr distinguishes 1.10 from 1.1 and -0.0 from 0.0, which == does not.
        assert repr(actual) == repr(expected), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


# A 200 KB string of 1- to 4-byte UTF-8 characters.
LONG_STRING = "aé€🎉" * 20_000

ACCEPTED_VALUES: list[Any] = [
    pytest.param(None, id="none"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(0, id="int-zero"),
    pytest.param(-7, id="int-negative"),
    pytest.param(2**63 - 1, id="int-max-signed-64"),
    pytest.param(-(2**63), id="int-min-signed-64"),
    pytest.param(2**64 - 1, id="int-max-unsigned-64"),
    pytest.param(2**64, id="int-beyond-64"),
    pytest.param(-(2**63) - 1, id="int-below-signed-64"),
    pytest.param(10**40, id="int-big"),
    pytest.param(-(10**40), id="int-big-negative"),
    pytest.param(1.5, id="float"),
    pytest.param(1.0, id="float-whole"),
    pytest.param(0.1, id="float-inexact"),
    pytest.param(-0.0, id="float-negative-zero"),
    pytest.param(1.7976931348623157e308, id="float-max"),
    pytest.param(5e-324, id="float-min-subnormal"),
    pytest.param("", id="str-empty"),
    pytest.param("héllo wörld ✓ 日本語 🎉", id="str-unicode"),
    pytest.param("nul\x00 and \ud7ff", id="str-control"),
    pytest.param(LONG_STRING, id="str-200kb"),
    pytest.param([], id="list-empty"),
    pytest.param([1, "a", None, 2.5], id="list"),
    pytest.param({}, id="dict-empty"),
    pytest.param({"a": 1, "b": [True, None]}, id="dict"),
    pytest.param((), id="tuple-empty"),
    pytest.param((1, "a", (2, 3)), id="tuple-nested"),
    pytest.param(b"", id="bytes-empty"),
    pytest.param(b"\x00\xff\xfe binary", id="bytes"),
    pytest.param(datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC), id="datetime-utc"),
    pytest.param(
        datetime(2024, 1, 1, 8, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        id="datetime-offset-positive",
    ),
    pytest.param(
        datetime(1999, 12, 31, 23, 0, 1, tzinfo=timezone(timedelta(hours=-8))),
        id="datetime-offset-negative",
    ),
    pytest.param(date(2024, 2, 29), id="date"),
    pytest.param(timedelta(0), id="timedelta-zero"),
    pytest.param(timedelta(days=-3, seconds=5, microseconds=7), id="timedelta-negative"),
    pytest.param(timedelta(days=999_999, seconds=86_399, microseconds=999_999), id="timedelta-max"),
    pytest.param(uuid.UUID("12345678-1234-5678-1234-567812345678"), id="uuid"),
    pytest.param(Decimal("1.10"), id="decimal-trailing-zero"),
    pytest.param(Decimal("-0.000001"), id="decimal-negative"),
    pytest.param(Decimal("1E+3"), id="decimal-exponent"),
    pytest.param(Decimal("12345678901234567890.123456789"), id="decimal-long"),
    pytest.param(Decimal("-0"), id="decimal-negative-zero"),
    pytest.param({"$uuid": "not-a-uuid"}, id="dict-dollar-tag-name"),
    pytest.param({"$dict": {"a": 1}}, id="dict-dollar-dict"),
    pytest.param({"$tuple": [1, 2]}, id="dict-dollar-tuple"),
    pytest.param({"$other": 1}, id="dict-dollar-unknown"),
    pytest.param({"$a": 1, "$b": 2}, id="dict-two-dollar-keys"),
    pytest.param([{"$bytes": "AAAA"}], id="list-of-dollar-dict"),
    pytest.param({"outer": {"$int": "5"}}, id="dict-nested-dollar"),
    pytest.param(
        {
            "rows": [
                {
                    "id": uuid.UUID(int=1),
                    "at": datetime(2024, 5, 1, tzinfo=UTC),
                    "tags": ("a", ("b", b"c")),
                    "big": 2**80,
                }
            ],
            "total": Decimal("10.50"),
            "span": timedelta(hours=1),
            "day": date(2020, 1, 1),
        },
        id="nested",
    ),
]


@pytest.mark.parametrize("value", ACCEPTED_VALUES)
def test_encoding_round_trip(value: Any) -> None:
    restored = round_trip(value)

    assert_identical(value, restored)


def test_encoding_zoneinfo_datetime() -> None:
    value = datetime(2024, 7, 1, 12, 0, tzinfo=ZoneInfo("Europe/Paris"))

    restored = round_trip(value)

    assert type(restored) is datetime
    assert restored == value
    assert restored.utcoffset() == timedelta(hours=2)


def test_encoding_multiple_attributes() -> None:
    job = StateJob("first")
    job.count = 3  # type: ignore[attr-defined]
    job.when = date(2024, 1, 2)  # type: ignore[attr-defined]

    envelope = build_envelope(job, uuid.uuid4().hex)
    rebuilt = LOADER.rebuild(parse_envelope(encoding.dumps(envelope)))

    assert vars(rebuilt) == {"value": "first", "count": 3, "when": date(2024, 1, 2)}


class Color(enum.StrEnum):
    RED = "red"


class Name(str):
    pass


class Count(int):
    pass


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


class Pair(NamedTuple):
    left: int
    right: int


MODULE = __name__

# value, expected attribute path, expected type name
REJECTED_VALUES: list[Any] = [
    pytest.param(datetime(2024, 1, 1), "value", "datetime.datetime", id="datetime-naive"),
    pytest.param(float("nan"), "value", "float", id="float-nan"),
    pytest.param(float("inf"), "value", "float", id="float-inf"),
    pytest.param(float("-inf"), "value", "float", id="float-negative-inf"),
    pytest.param(Decimal("NaN"), "value", "decimal.Decimal", id="decimal-nan"),
    pytest.param(Decimal("sNaN"), "value", "decimal.Decimal", id="decimal-signaling-nan"),
    pytest.param(Decimal("-Infinity"), "value", "decimal.Decimal", id="decimal-infinity"),
    pytest.param({1, 2}, "value", "set", id="set"),
    pytest.param(frozenset({1}), "value", "frozenset", id="frozenset"),
    pytest.param(object(), "value", "object", id="object"),
    pytest.param(Color.RED, "value", f"{MODULE}.Color", id="str-enum"),
    pytest.param(Name("x"), "value", f"{MODULE}.Name", id="str-subclass"),
    pytest.param(Count(1), "value", f"{MODULE}.Count", id="int-subclass"),
    pytest.param(Pair(1, 2), "value", f"{MODULE}.Pair", id="namedtuple"),
    pytest.param(
        collections.OrderedDict(a=1), "value", "collections.OrderedDict", id="ordereddict"
    ),
    pytest.param(bytearray(b"x"), "value", "bytearray", id="bytearray"),
    pytest.param(time(12, 0), "value", "datetime.time", id="time"),
    pytest.param(1j, "value", "complex", id="complex"),
    pytest.param(Point(1), "value", f"{MODULE}.Point", id="custom-class"),
    pytest.param({1: "a"}, "value[1]", "int", id="dict-int-key"),
    pytest.param({"a": [1, object()]}, "value['a'][1]", "object", id="nested-object"),
    pytest.param(
        (1, datetime(2024, 1, 1)), "value[1]", "datetime.datetime", id="tuple-naive-datetime"
    ),
    pytest.param([{"x": float("nan")}], "value[0]['x']", "float", id="nested-nan"),
]


@pytest.mark.parametrize(("value", "attribute", "type_name"), REJECTED_VALUES)
def test_encoding_rejects(value: Any, attribute: str, type_name: str) -> None:
    with pytest.raises(JobStateError) as caught:
        build_envelope(StateJob(value), uuid.uuid4().hex)

    error = caught.value
    message = str(error)
    assert isinstance(error, TypeError)
    assert error.job_class == STATE_JOB_PATH
    assert error.attribute == attribute
    assert error.type_name == type_name
    assert STATE_JOB_PATH in message
    assert repr(attribute) in message
    assert type_name in message


def test_encoding_rejects_lone_surrogate() -> None:
    # A str with an unpaired surrogate has no UTF-8 form, so it cannot be stored as JSON.
    job = StateJob("before \ud800 after")

    with pytest.raises(JobStateError) as caught:
        encoding.dumps(build_envelope(job, uuid.uuid4().hex))

    assert caught.value.job_class == STATE_JOB_PATH
    assert caught.value.attribute == "value"


def test_envelope_rejects_main_class() -> None:
    script = (
        "import json\n"
        "from spark_bg.errors import JobStateError\n"
        "from spark_bg.job import Job, build_envelope\n"
        "class MainJob(Job):\n"
        "    def run(self):\n"
        "        pass\n"
        "try:\n"
        "    build_envelope(MainJob(), 'id-1')\n"
        "except JobStateError as exc:\n"
        "    print(json.dumps({'job_class': exc.job_class, 'message': str(exc)}))\n"
        "else:\n"
        "    print(json.dumps(None))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    error = json.loads(result.stdout)
    assert error is not None, "build_envelope accepted a job class defined in __main__"
    assert error["job_class"] == "__main__:MainJob"
    assert "__main__" in error["message"]
    assert "importable module" in error["message"]


def test_envelope_rejects_local_class() -> None:
    class LocalJob(Job):
        def run(self) -> None:
            pass

    with pytest.raises(JobStateError) as caught:
        build_envelope(LocalJob(), uuid.uuid4().hex)

    assert "<locals>.LocalJob" in caught.value.job_class
    assert "inside a function" in str(caught.value)


class NoRunJob(Job):
    pass


def test_envelope_rejects_missing_run() -> None:
    with pytest.raises(JobStateError) as caught:
        build_envelope(NoRunJob(), uuid.uuid4().hex)

    assert caught.value.job_class == f"{MODULE}:NoRunJob"
    assert "run()" in str(caught.value)


def test_envelope_rejects_missing_run_on_every_push() -> None:
    for _ in range(2):
        with pytest.raises(JobStateError) as caught:
            build_envelope(NoRunJob(), uuid.uuid4().hex)

        assert "run()" in str(caught.value)


def test_new_job_ids_unique_across_threads() -> None:
    per_thread = 5000
    results: list[list[str]] = []

    def take() -> None:
        results.append([new_job_id() for _ in range(per_thread)])

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [job_id for chunk in results for job_id in chunk]

    assert len(ids) == 8 * per_thread
    assert len(set(ids)) == len(ids)
    assert all(len(job_id) == 32 for job_id in ids)
    assert all(set(job_id) <= set("0123456789abcdef") for job_id in ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_new_job_ids_differ_in_forked_child() -> None:
    new_job_id()  # The parent has now read ids ahead.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, " ".join(new_job_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_ids = set(pipe.read().decode().split())
    _, status = os.waitpid(pid, 0)
    parent_ids = {new_job_id() for _ in range(100)}

    assert status == 0
    assert len(child_ids) == 100
    assert not child_ids & parent_ids


@pytest.mark.parametrize("name", ["", "two words", "x" * 201, "tab\tname", 5, ["default"]])
def test_envelope_rejects_invalid_queue(name: Any) -> None:
    for _ in range(2):
        with pytest.raises(ConfigurationError) as caught:
            build_envelope(StateJob(1), uuid.uuid4().hex, queue=name)

        assert repr(name) in str(caught.value)


def test_envelope_accepts_queue_again() -> None:
    for _ in range(2):
        envelope = build_envelope(StateJob(1), uuid.uuid4().hex, queue="emails.high-1")

        assert envelope["queue"] == "emails.high-1"


def test_envelope_rejects_non_job() -> None:
    with pytest.raises(TypeError) as caught:
        build_envelope(Point(1), uuid.uuid4().hex)  # type: ignore[arg-type]

    assert "Point" in str(caught.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("queue", "other"),
        ("max_attempts", 5),
        ("timeout_s", 1.0),
        ("backoff_base_s", 2.0),
        ("backoff_max_s", 60.0),
        ("fail_on", ()),
        ("run_in_process", True),
    ],
)
def test_envelope_rejects_option_attribute(option: str, value: Any) -> None:
    job = StateJob(1)
    setattr(job, option, value)

    with pytest.raises(JobStateError) as caught:
        build_envelope(job, uuid.uuid4().hex)

    assert caught.value.job_class == STATE_JOB_PATH
    assert caught.value.attribute == option
    assert repr(option) in str(caught.value)


def test_loader_rebuild_skips_init() -> None:
    job = object.__new__(InitRaisesJob)
    job.value = 7

    envelope = build_envelope(job, uuid.uuid4().hex)
    rebuilt = LOADER.rebuild(parse_envelope(encoding.dumps(envelope)))

    assert type(rebuilt) is InitRaisesJob
    assert rebuilt.value == 7


def test_loader_registered_without_packages() -> None:
    loader = JobLoader()

    assert loader.load_class(STATE_JOB_PATH) is StateJob


@pytest.fixture
def probe_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A sys.path folder for throwaway modules and a unique module name prefix.

    Modules it names are removed from sys.modules afterwards.
    """
    prefix = f"spark_probe_{uuid.uuid4().hex}"
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, prefix
    for name in [name for name in sys.modules if name.startswith(prefix)]:
        del sys.modules[name]


def write_probe_module(folder: Path, name: str, marker: Path, extra: str = "") -> None:
    """Write module `name` with a job class `ProbeJob`. Importing the module creates `marker`."""
    source = (
        "from pathlib import Path\n"
        "from spark_bg.job import Job\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "class ProbeJob(Job):\n"
        "    def run(self):\n"
        "        pass\n"
        f"{extra}"
    )
    (folder / f"{name}.py").write_text(source)


def test_loader_rejects_module_outside_packages(probe_modules: tuple[Path, str]) -> None:
    folder, name = probe_modules
    marker = folder / "imported.txt"
    write_probe_module(folder, name, marker)
    assert importlib.util.find_spec(name) is not None, "the probe module is not importable"

    with pytest.raises(JobLoadError) as caught:
        JobLoader(packages=("tests",)).load_class(f"{name}:ProbeJob")

    assert name not in sys.modules
    assert not marker.exists()
    assert repr(name) in str(caught.value)


def test_loader_rejects_package_name_prefix(probe_modules: tuple[Path, str]) -> None:
    folder, name = probe_modules
    marker = folder / "imported.txt"
    write_probe_module(folder, f"{name}_extra", marker)
    assert importlib.util.find_spec(f"{name}_extra") is not None

    with pytest.raises(JobLoadError):
        JobLoader(packages=(name,)).load_class(f"{name}_extra:ProbeJob")

    assert f"{name}_extra" not in sys.modules
    assert not marker.exists()


def test_loader_imports_allowed_module(probe_modules: tuple[Path, str]) -> None:
    folder, name = probe_modules
    marker = folder / "imported.txt"
    write_probe_module(folder, name, marker)

    cls = JobLoader(packages=(name,)).load_class(f"{name}:ProbeJob")

    assert issubclass(cls, Job)
    assert cls.__module__ == name
    assert cls.__qualname__ == "ProbeJob"
    assert marker.exists()


def test_loader_import_error(probe_modules: tuple[Path, str]) -> None:
    folder, name = probe_modules
    marker = folder / "imported.txt"
    write_probe_module(folder, name, marker, extra="raise RuntimeError('broken module')\n")

    with pytest.raises(JobLoadError) as caught:
        JobLoader(packages=(name,)).load_class(f"{name}:ProbeJob")

    assert "broken module" in str(caught.value)


@pytest.mark.parametrize(
    ("packages", "path"),
    [
        (("tests",), "tests.jobs:NotAJob"),
        (("tests",), "tests.jobs:not_a_job"),
        (("tests",), "tests.jobs:Missing"),
        (("tests",), "tests.jobs:StateJob.run"),
        (("os",), "os:system"),
        (("builtins",), "builtins:object"),
    ],
)
def test_loader_rejects_non_job(packages: tuple[str, ...], path: str) -> None:
    with pytest.raises(JobLoadError) as caught:
        JobLoader(packages=packages).load_class(path)

    assert repr(path) in str(caught.value)


@pytest.mark.parametrize("path", ["tests.jobs", ":StateJob", "tests.jobs:", ""])
def test_loader_rejects_invalid_name(path: str) -> None:
    with pytest.raises(JobLoadError):
        LOADER.load_class(path)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{not json", id="invalid-json"),
        pytest.param(b"\xff\xfe", id="invalid-utf8"),
        pytest.param(b'{"id": "a"', id="truncated"),
    ],
)
def test_parse_envelope_invalid_json(payload: bytes) -> None:
    with pytest.raises(JobLoadError) as caught:
        parse_envelope(payload)

    assert "JSON" in str(caught.value)


@pytest.mark.parametrize(
    "document",
    [
        pytest.param([], id="list"),
        pytest.param("text", id="str"),
        pytest.param(1, id="int"),
        pytest.param(None, id="null"),
        pytest.param({}, id="empty-object"),
        pytest.param({"class": STATE_JOB_PATH, "state": {}}, id="missing-id"),
        pytest.param({"id": "a", "state": {}}, id="missing-class"),
        pytest.param({"id": "a", "class": STATE_JOB_PATH}, id="missing-state"),
        pytest.param({"id": 1, "class": STATE_JOB_PATH, "state": {}}, id="id-not-str"),
        pytest.param({"id": "a", "class": ["x"], "state": {}}, id="class-not-str"),
        pytest.param({"id": "a", "class": STATE_JOB_PATH, "state": []}, id="state-not-object"),
    ],
)
def test_parse_envelope_not_envelope(document: Any) -> None:
    with pytest.raises(JobLoadError) as caught:
        parse_envelope(json.dumps(document).encode())

    assert "envelope" in str(caught.value)
