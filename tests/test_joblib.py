"""joblib.Memory on dagger stores (``backend="dagger"``): memory://, a local folder, S3 (moto).

Everything goes through joblib's public ``Memory`` API, on real stores; nothing is mocked. The
cached functions live in small module files written under ``tmp_path`` (importable by name in
other processes) and append a line to a log file each time they run, so a test counts
executions by reading the log, in this process and in others.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import joblib
import numpy as np
import pytest
from joblib.memory import CacheWarning

import dagger_store as ds
import dagger_store.joblib as dj
from dagger_store import gc, pins
from dagger_store.layout import BLOBS, blob_key
from dagger_store.signing import LAB_KEY_ENV, LAB_KEY_FILE_ENV

LAB_KEY = "lab-key-" + "0123456789" * 4

# A cached function whose code names its version, and which logs every execution.
SOURCE = """\
import numpy as np

LOG = {log!r}


def compute(x):
    with open(LOG, "a") as log:
        log.write("{version} %d\\n" % x)
    with open(LOG) as log:
        run = len(log.readlines())
    return {{"version": "{version}", "x": x, "run": run, "square": np.arange(1000.0) * x}}


def square(x):
    with open(LOG, "a") as log:
        log.write("square %d\\n" % x)
    return np.arange(1000.0) * x
"""

# Another process: the same module, a new Memory on the same location, one call.
CHILD = """\
import importlib, json, sys
import joblib
import dagger_store.joblib

module = importlib.import_module(sys.argv[1])
options = json.loads(sys.argv[3])
memory = joblib.Memory(sys.argv[2], backend="dagger", verbose=0, backend_options=options)
out = memory.cache(module.compute)(int(sys.argv[4]))
print(json.dumps({"version": out["version"], "run": out["run"], "sum": out["square"].sum()}))
"""

# The same random array from every call of random_pair: 2 MiB of float64 that zstd cannot shrink.
_RANDOM = np.random.default_rng(0).standard_normal(2**18)


def random_pair(tag: int) -> tuple[int, np.ndarray]:
    return tag, _RANDOM.copy()


def unpicklable(x: int) -> Callable[[], int]:
    return lambda: x


@pytest.fixture(autouse=True)
def _no_lab_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAB_KEY_ENV, raising=False)
    monkeypatch.delenv(LAB_KEY_FILE_ENV, raising=False)


class Functions:
    """A module of cached functions written under tmp_path, and its execution log."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"jlmod_{uuid.uuid4().hex[:12]}"
        self.log = tmp_path / f"{self.name}.log"
        self.log.touch()
        self.tmp_path = tmp_path

    def write(self, version: str) -> Path:
        """The module file of ``version`` (its functions' code carries the version)."""
        folder = self.tmp_path / f"modules-{version}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{self.name}.py"
        path.write_text(SOURCE.format(log=str(self.log), version=version))
        return path

    def load(self, version: str = "v1") -> ModuleType:
        """A fresh module object of this name and ``version`` (not put in sys.modules)."""
        path = self.write(version)
        spec = importlib.util.spec_from_file_location(self.name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def runs(self) -> list[str]:
        return self.log.read_text().splitlines()

    def in_another_process(
        self, version: str, location: str, options: dict[str, Any], x: int
    ) -> dict[str, Any]:
        """Call ``compute(x)`` through a new Memory in a new Python process; its JSON output."""
        folder = self.write(version).parent
        path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}
        done = subprocess.run(
            [sys.executable, "-c", CHILD, self.name, location, json.dumps(options), str(x)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@pytest.fixture
def functions(tmp_path: Path) -> Functions:
    return Functions(tmp_path)


def memory_url() -> str:
    return f"memory://joblib-test-{uuid.uuid4().hex}"


@pytest.fixture(params=["memory", "local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A store location and the backend_options it needs (S3: trusted, to load pickles)."""
    if request.param == "memory":
        return memory_url(), {}
    if request.param == "local":
        return str(tmp_path / "cache"), {}
    options = {"storage_options": request.getfixturevalue("s3_storage_options"), "trust": True}
    return request.getfixturevalue("s3_url"), options


def open_memory(location: str | Path, **options: Any) -> joblib.Memory:
    return joblib.Memory(location, backend="dagger", verbose=0, backend_options=options)


def blob_files(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (root / "v1" / "blobs").rglob("*") if p.is_file()}


# -- hits ----------------------------------------------------------------------------------------


def test_a_cached_call_is_not_executed_again(
    where: tuple[str, dict[str, Any]], functions: Functions
) -> None:
    location, options = where
    compute = open_memory(location, **options).cache(functions.load().compute)

    first = compute(3)
    again = compute(3)

    assert functions.runs() == ["v1 3"]
    assert again["run"] == first["run"] == 1
    np.testing.assert_array_equal(again["square"], np.arange(1000.0) * 3)
    assert again["square"].flags.writeable  # as joblib's own backend returns arrays
    assert compute.check_call_in_cache(3)
    assert not compute.check_call_in_cache(4)
    compute(4)
    assert functions.runs() == ["v1 3", "v1 4"]


def test_the_location_is_the_store_itself(tmp_path: Path, functions: Functions) -> None:
    # Memory joins "joblib" to a str location, not to a Path: both name the same store here.
    module = functions.load()
    as_str = open_memory(str(tmp_path / "cache"))
    as_path = open_memory(tmp_path / "cache")

    as_str.cache(module.compute)(2)
    as_path.cache(module.compute)(2)

    assert functions.runs() == ["v1 2"]
    assert (tmp_path / "cache" / "dagger-store").is_file()
    assert not (tmp_path / "cache" / "joblib").exists()
    assert as_str.store_backend.location == as_path.store_backend.location
    assert dj.store_url("s3://bucket/prefix/joblib") == "s3://bucket/prefix"
    assert dj.store_url("memory://joblib") == "memory://joblib"  # a store called "joblib"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_another_process_gets_a_hit_without_executing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, functions: Functions
) -> None:
    if kind == "local":
        location, options = str(tmp_path / "cache"), {}
    else:
        location = request.getfixturevalue("s3_url")
        options = {"storage_options": request.getfixturevalue("s3_storage_options"), "trust": True}
    first = open_memory(location, **options).cache(functions.load().compute)(5)

    theirs = functions.in_another_process("v1", location, options, 5)

    assert functions.runs() == ["v1 5"]  # the other process did not append
    assert theirs == {"version": "v1", "run": first["run"], "sum": first["square"].sum()}


# -- what is stored ------------------------------------------------------------------------------


def test_equal_arrays_are_stored_once(tmp_path: Path) -> None:
    memory = open_memory(str(tmp_path / "cache"))
    pair = memory.cache(random_pair)

    pair(1)
    after_first = blob_files(tmp_path / "cache")
    tag, array = pair(2)  # another call, returning the same 2 MiB array
    after_second = blob_files(tmp_path / "cache")

    assert tag == 2
    np.testing.assert_array_equal(array, _RANDOM)
    assert sum(after_first.values()) > _RANDOM.nbytes
    new = set(after_second) - set(after_first)
    assert len(new) == 1  # only the second call's pickle; the array's blob was there
    assert sum(after_second[name] for name in new) < 1024


def test_a_corrupt_blob_is_never_returned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    pair = open_memory(str(root)).cache(random_pair)
    pair(7)
    sizes = blob_files(root)
    name = max(sizes, key=sizes.__getitem__)  # the array's
    blob = root / "v1" / "blobs" / name[:2] / name
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)  # objects are read-only; their owner can still change them
    blob.write_bytes(bytes(data))

    # joblib catches the IntegrityError, logs it and computes the value again.
    with caplog.at_level(logging.WARNING, logger="joblib"):
        tag, array = pair(7)
    assert tag == 7
    np.testing.assert_array_equal(array, _RANDOM)
    assert "IntegrityError" in caplog.text
    # Asked for the stored value alone, joblib turns the IntegrityError into a KeyError.
    with pytest.raises(KeyError, match="corrupted") as raised:
        pair.call_and_shelve(7).get()
    assert isinstance(raised.value.__cause__, ds.IntegrityError)


# -- trust ---------------------------------------------------------------------------------------


def test_an_untrusted_store_never_unpickles(
    s3_url: str,
    s3_storage_options: dict[str, Any],
    s3_client: Any,
    functions: Functions,
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = functions.load()
    untrusted = open_memory(s3_url, storage_options=s3_storage_options)
    assert not untrusted.store_backend.store.trusted
    compute = untrusted.cache(module.compute)
    compute(3)  # stored: writing needs no trust

    # joblib catches the refusal, logs it and computes the value again.
    with caplog.at_level(logging.WARNING, logger="joblib"):
        assert compute(3)["run"] == 2
    assert functions.runs() == ["v1 3", "v1 3"]
    assert "UntrustedError" in caplog.text and "'trust': True" in caplog.text
    with pytest.raises(ds.UntrustedError, match="require_signatures"):
        compute.call_and_shelve(3).get()

    trusted = open_memory(s3_url, storage_options=s3_storage_options, trust=True)
    assert trusted.cache(module.compute)(3)["run"] == 1

    # Refused before the pickle is read: garbage in its place is not even noticed.
    store = trusted.store_backend.store
    (index,) = [k for k in store.backend.iter_keys(dj.JOBLIB) if "/results/" in k]
    pickled = store.get_manifest(ds.NodeKey(index.rsplit("/", 1)[1])).blobs["pickle"]
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    key = f"{prefix}/{blob_key(pickled)}"
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"not a pickle")
    with pytest.raises(ds.UntrustedError):
        compute.call_and_shelve(3).get()
    with pytest.raises(KeyError, match="corrupted") as raised:  # where a trusted reader reads it
        trusted.cache(module.compute).call_and_shelve(3).get()
    assert isinstance(raised.value.__cause__, ds.IntegrityError)

    signed = open_memory(s3_url, storage_options=s3_storage_options, lab_key=LAB_KEY)
    assert signed.store_backend.store.trusted  # signatures required: a remote store with a key
    signed.cache(module.compute)(4)
    assert signed.cache(module.compute)(4)["run"] == 3
    assert len(functions.runs()) == 3


# -- code changes --------------------------------------------------------------------------------


def test_changed_code_keeps_the_other_versions_results(
    tmp_path: Path, functions: Functions
) -> None:
    location = str(tmp_path / "cache")
    memory = open_memory(location)
    compute = memory.cache(functions.load("v1").compute)
    assert compute(2)["version"] == "v1"

    # A colleague runs v2 of the function on the same store: it is not a hit for them...
    assert functions.in_another_process("v2", location, {}, 2)["version"] == "v2"
    assert functions.runs() == ["v1 2", "v2 2"]
    # ...and nothing of v1 was deleted: v1 still hits here, and both results are listed.
    assert compute(2)["run"] == 1
    assert len(memory.store_backend.get_items()) == 2

    # In this process too: joblib notices the change (a miss, once) but nothing is cleared.
    v2 = memory.cache(functions.load("v2").compute)
    assert not v2.check_call_in_cache(2)  # joblib's change detection answers first
    assert v2.check_call_in_cache(2)
    assert v2(2)["run"] == 2  # the colleague's result
    assert functions.runs() == ["v1 2", "v2 2"]
    assert len(memory.store_backend.get_items()) == 2


# -- clearing ------------------------------------------------------------------------------------


def test_clear_and_func_clear_delete_results_and_never_blobs(functions: Functions) -> None:
    memory = open_memory(memory_url())
    store = memory.store_backend.store
    module = functions.load()
    compute, square = memory.cache(module.compute), memory.cache(module.square)
    compute(1)
    compute(2)
    square(1)
    shelved = compute.call_and_shelve(5)
    assert functions.runs() == ["v1 1", "v1 2", "square 1", "v1 5"]

    shelved.clear()  # one result
    assert not compute.check_call_in_cache(5) and compute.check_call_in_cache(1)
    compute.clear()  # the function's results, every code version's
    assert not compute.check_call_in_cache(1) and not compute.check_call_in_cache(2)
    assert square.check_call_in_cache(1)

    # An experiment's state naming the same array as square(1)'s result, kept by a pin.
    weights = store.put(np.arange(1000.0))
    state = ds.node_key("state", {"test": uuid.uuid4().hex})
    store.commit(state, ds.Manifest({"weights": weights}))
    pins.pin(store, f"keep-{uuid.uuid4().hex[:8]}", [state])
    blobs = list(store.backend.iter_keys(BLOBS))

    memory.clear(warn=False)
    assert list(store.backend.iter_keys(dj.JOBLIB)) == []
    assert list(store.backend.iter_keys(BLOBS)) == blobs  # clearing deletes no blob
    swept = gc.collect(store, grace=0, keep_recent=0, dry_run=False)
    assert swept.blobs and store.has_blobs([weights]) == [True]  # gc keeps what a pin names
    assert len(list(store.backend.iter_keys(BLOBS))) == 1

    compute(1)
    assert functions.runs()[-1] == "v1 1"


def test_an_invalidated_result_is_replaced(functions: Functions) -> None:
    seen: list[dict[str, Any]] = []
    valid = True

    def still_valid(metadata: dict[str, Any]) -> bool:
        seen.append(metadata)
        return valid

    memory = open_memory(memory_url())
    compute = memory.cache(functions.load().compute, cache_validation_callback=still_valid)
    compute(3)
    assert compute(3)["run"] == 1
    assert seen[0]["input_args"] == {"x": "3"} and seen[0]["duration"] >= 0

    valid = False
    assert compute(3)["run"] == 2  # cleared (clear_item), computed again
    valid = True
    assert compute(3)["run"] == 2  # the new result, not the first one written
    assert len(functions.runs()) == 2


def test_reduce_size_keeps_the_most_recently_used(functions: Functions) -> None:
    memory = open_memory(memory_url())
    compute = memory.cache(functions.load().compute)
    for x in (1, 2, 3):
        compute(x)
    compute(1)  # a hit: now the most recently used

    memory.reduce_size(items_limit=1)
    assert compute.check_call_in_cache(1)
    assert not compute.check_call_in_cache(2) and not compute.check_call_in_cache(3)
    memory.reduce_size(bytes_limit="1K")
    assert memory.store_backend.get_items() == []
    with pytest.raises(ValueError, match="positive"):
        memory.reduce_size(age_limit=-datetime.timedelta(seconds=1))


# -- joblib's other paths ------------------------------------------------------------------------


def test_pickled_functions_and_results_keep_working(
    functions: Functions, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = functions.load()
    monkeypatch.setitem(sys.modules, module.__name__, module)  # pickled by reference
    compute = open_memory(memory_url()).cache(module.compute)
    compute(3)
    shelved = compute.call_and_shelve(4)

    assert pickle.loads(pickle.dumps(compute))(3)["run"] == 1
    assert pickle.loads(pickle.dumps(shelved)).get()["x"] == 4
    assert functions.runs() == ["v1 3", "v1 4"]


def test_an_unpicklable_result_is_returned_and_not_cached() -> None:
    make = open_memory(memory_url()).cache(unpicklable)
    with pytest.warns(CacheWarning, match="Unable to cache"):
        assert make(3)() == 3
    assert not make.check_call_in_cache(3)


def test_bad_options_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unknown backend_options.*storage_options"):
        open_memory(memory_url(), storage_option={})
    with pytest.raises(ValueError, match="compression_level"):
        joblib.Memory(memory_url(), backend="dagger", compress=3)
    with pytest.raises(ValueError, match="mmap_mode=None"):
        joblib.Memory(memory_url(), backend="dagger", mmap_mode="r")
    with pytest.raises(ds.StoreOpenError, match="s3:// stores only"):
        open_memory(memory_url(), storage_options={"anon": True})
    with pytest.raises(ds.StoreOpenError, match="too short"):
        open_memory(memory_url(), lab_key="short")
    (tmp_path / "notes.txt").write_text("not a store")
    with pytest.raises(ds.StoreOpenError, match="not a dagger store"):
        open_memory(str(tmp_path))
    memory = open_memory(memory_url())
    with pytest.raises(ValueError, match="not a location of this joblib cache"):
        memory.store_backend.clear_location("/somewhere/else")
