"""Backends from outside the package: registered by scheme, or found as installed plugins.

The backend here is written the way a lab's own would be: against the documented seam only
(``dagger_store.backends.base``), in this module, and registered with ``register_backend``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import dagger_store as ds
from dagger_store import registry
from dagger_store.backends.base import Buffer, check_key
from dagger_store.backends.cached import CachedBackend
from dagger_store.testing import BackendContract

LAB_KEY = "a lab key long enough to be a key"


class DictBackend:
    """A lab's own backend: values in a dict. It says itself whether it is remote and whether
    its location is trusted (here: as its opener was told)."""

    def __init__(
        self, url: str, *, remote: bool = False, trusted: bool = True, options: Any = None
    ) -> None:
        self.url = url
        self.remote = remote
        self.trusted = trusted
        self.options = options
        self.values: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def trusted_by_location(self) -> bool:
        return self.trusted

    def read(self, key: str) -> bytes:
        check_key(key)
        try:
            return self.values[key]
        except KeyError:
            raise ds.NotFoundError(f"no such key {key!r} in {self.url}", key=key) from None

    def write_once(self, key: str, *parts: Buffer) -> bool:
        check_key(key)
        data = b"".join(parts)
        with self._lock:
            if key in self.values:
                return False
            self.values[key] = data
            return True

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        for key in keys:
            check_key(key)
        with self._lock:
            return [key in self.values for key in keys]

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            keys = sorted(k for k in self.values if k.startswith(prefix))
        yield from keys


_lab_backends: dict[str, DictBackend] = {}
_opened: list[tuple[str, Mapping[str, Any]]] = []


def open_labtest(url: str, storage_options: Mapping[str, Any]) -> DictBackend:
    """``labtest://NAME``: one DictBackend per name, described by the options it is opened with
    (``remote``, ``trusted``); any other option is kept, to be looked at."""
    _opened.append((url, storage_options))
    if url not in _lab_backends:
        _lab_backends[url] = DictBackend(
            url,
            remote=bool(storage_options.get("remote", False)),
            trusted=bool(storage_options.get("trusted", True)),
            options=dict(storage_options),
        )
    return _lab_backends[url]


@pytest.fixture(autouse=True)
def labtest_scheme() -> Iterator[None]:
    ds.register_backend("labtest", open_labtest)  # registering the same opener again: no-op
    yield
    _lab_backends.clear()
    _opened.clear()


class TestDictBackend(BackendContract):
    @pytest.fixture
    def backend(self) -> DictBackend:
        return DictBackend("labtest://contract")

    def plant(self, backend: DictBackend, key: str, data: bytes) -> None:
        backend.values[key] = data


def test_a_registered_scheme_opens_a_store() -> None:
    store = ds.open_store("labtest://shared")
    digest = store.put(b"weights")
    key = ds.node_key("state", {"seed": 0})
    assert store.commit(key, ds.Manifest({"w": digest})).won
    assert isinstance(store.backend, DictBackend) and store.url == "labtest://shared"
    again = ds.open_store("labtest://shared", create=False)  # the marker is there: a store
    assert again.get(digest) == b"weights" and again.missing([key]) == []
    assert store.trusted  # this backend vouches for itself: pickles may load
    assert "labtest" in registry.registered_schemes()


def test_storage_options_reach_the_opener_read_only() -> None:
    store = ds.open_store("labtest://opts", storage_options={"region": "lab-1", "trusted": False})
    ((url, options),) = _opened
    assert url == "labtest://opts" and dict(options) == {"region": "lab-1", "trusted": False}
    with pytest.raises(TypeError):
        options["region"] = "changed"  # type: ignore[index]
    assert not store.trusted  # the backend's own answer, from its options


def test_a_bare_backend_then_a_store_over_it(tmp_path: Path) -> None:
    backend = ds.open_backend("labtest://far", {"remote": True, "trusted": False})
    assert backend.remote and backend.values == {}  # type: ignore[attr-defined]
    with ds.open_store(backend, cache_dir=tmp_path / "cache", lab_key=LAB_KEY) as store:
        assert isinstance(store.backend, CachedBackend) and store.backend.origin is backend
        assert store.backend.remote and store.require_signatures and store.trusted
        digest = store.put(b"read through")
        assert store.get(digest) == b"read through"
    with pytest.raises(ds.StoreOpenError, match="storage_options are for opening a URL"):
        ds.open_store(backend, storage_options={"remote": True})
    near = ds.open_backend("labtest://near")
    assert not near.remote
    assert not ds.open_store(near, lab_key=LAB_KEY).require_signatures
    with pytest.raises(ds.StoreOpenError, match="remote stores"):
        ds.open_store(near, cache_dir=tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists()


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ds.StoreOpenError, match="unknown scheme 'nosuch'") as info:
        ds.open_store("nosuch://bucket/x")
    message = str(info.value)
    for scheme in ("file://", "memory://", "s3://", "labtest://"):
        assert scheme in message
    assert "register_backend" in message and registry.ENTRY_POINT_GROUP in message
    assert info.value.url == "nosuch://bucket/x"


def test_schemes_without_options_refuse_them_by_name(tmp_path: Path) -> None:
    for url in (str(tmp_path / "s"), f"file://{tmp_path}/s", "memory://opts"):
        with pytest.raises(ds.StoreOpenError, match="'endpoint_url'") as info:
            ds.open_backend(url, {"endpoint_url": "http://x"})
        assert info.value.url == url and url in str(info.value)
    assert not (tmp_path / "s").exists()


def test_registering_checks_its_arguments() -> None:
    def other(url: str, storage_options: Mapping[str, Any]) -> DictBackend:
        return DictBackend(url)

    for bad in ("", "S3", "1abc", "a b", "x://"):
        with pytest.raises(ValueError, match="scheme"):
            ds.register_backend(bad, other)
    with pytest.raises(TypeError, match="opener"):
        ds.register_backend("labtest", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered already"):
        ds.register_backend("labtest", other)
    try:
        ds.register_backend("labtest", other, replace=True)
        assert type(ds.open_backend("labtest://replaced")) is DictBackend
        assert _opened == []  # the replacement opened it
    finally:
        ds.register_backend("labtest", open_labtest, replace=True)


def test_an_opener_must_return_a_backend() -> None:
    def wrong(url: str, storage_options: Mapping[str, Any]) -> Any:
        return {"not": "a backend"}

    ds.register_backend("labwrong", wrong)
    try:
        with pytest.raises(TypeError, match="not a dagger_store Backend"):
            ds.open_backend("labwrong://x")
    finally:
        registry._openers.pop("labwrong")


# -- an installed plugin, found through its entry point ------------------------------------------

PLUGIN = '''
from dagger_store.backends.memory import MemoryBackend
from dagger_store.registry import no_options

OPENED = []


class PlugBackend(MemoryBackend):
    """The plugin's backend: memory that calls itself remote."""

    remote = True

    def trusted_by_location(self):
        return False


def open_plug(url, storage_options):
    no_options(url, storage_options)
    OPENED.append(url)
    return PlugBackend(url)
'''


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A distribution installed on sys.path as pip would leave it: a module and its dist-info
    declaring entry points in dagger_store's group. Returns the module's name."""
    module = "dagger_labplug"
    (tmp_path / f"{module}.py").write_text(PLUGIN)
    info = tmp_path / "dagger_labplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dagger-labplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\n"
        f"plugscheme = {module}:open_plug\n"
        f"plugbroken = {module}:no_such_opener\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module
    for scheme in ("plugscheme", "plugbroken"):  # registered on first use: forget it again
        registry._openers.pop(scheme, None)
    sys.modules.pop(module, None)


def test_an_installed_plugin_is_found_through_its_entry_point(installed_plugin: str) -> None:
    assert installed_plugin not in sys.modules  # importing dagger_store loads no plugin
    assert "plugscheme" not in registry.registered_schemes()
    with ds.open_store("plugscheme://x", lab_key=LAB_KEY) as store:
        digest = store.put(b"from a plugin")
        assert store.get(digest) == b"from a plugin"
        assert store.url == "plugscheme://x"
        assert store.backend.remote and store.require_signatures  # as the plugin describes it
    plugin = sys.modules[installed_plugin]
    assert plugin.OPENED == ["plugscheme://x"]
    assert "plugscheme" in registry.registered_schemes()  # loaded once, then registered
    ds.open_backend("plugscheme://y")
    assert plugin.OPENED == ["plugscheme://x", "plugscheme://y"]
    with pytest.raises(ds.StoreOpenError, match="takes no storage_options"):
        ds.open_backend("plugscheme://z", {"key": "k"})


def test_plugins_are_listed_and_a_broken_one_says_so(installed_plugin: str) -> None:
    with pytest.raises(ds.StoreOpenError, match="unknown scheme") as info:
        ds.open_store("nosuch://x")
    assert "plugscheme://" in str(info.value)  # installed, not loaded yet: offered all the same
    with pytest.raises(ds.StoreOpenError, match="failed to load") as broken:
        ds.open_store("plugbroken://x")
    assert "no_such_opener" in str(broken.value) and broken.value.url == "plugbroken://x"
