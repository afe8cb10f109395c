"""Trust: pickles load only from trusted stores; signed manifests; no credential ever leaks.

Real local folders and a real S3 server (moto on loopback, ``conftest.py``); nothing is mocked.
An attacker here is anyone who can write the store's objects directly, bypassing dagger: they
can recompute a BLAKE3 checksum, but not an HMAC without the lab key.
"""

from __future__ import annotations

import logging
import os
import pickle
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from blake3 import blake3

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_orchestrate.codecs import load_attribute, save_attribute
from dagger_orchestrate.persist import load_state
from dagger_store.layout import manifest_key
from dagger_store.manifest import SIGNATURE_SIZE, Frame
from dagger_store.signing import LAB_KEY_ENV, LAB_KEY_FILE_ENV

KEY = "lab-key-" + "5eb1c0ffee" * 4
OTHER_KEY = "other-lab-key-" + "d00dfeed42" * 4


@pytest.fixture(autouse=True)
def _no_lab_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAB_KEY_ENV, raising=False)
    monkeypatch.delenv(LAB_KEY_FILE_ENV, raising=False)


# -- where stores live: a local folder, or a prefix in an S3 bucket -------------------------------


@dataclass
class Location:
    """A store location, and raw access to its objects that bypasses dagger (the attacker's)."""

    url: str
    options: dict[str, Any]
    read: Callable[[str], bytes]
    plant: Callable[[str, bytes], None]  # overwrites: write-once binds dagger, not an attacker

    def open(self, **kwargs: Any) -> ds.Store:
        return ds.open_store(self.url, storage_options=self.options or None, **kwargs)


def local_location(root: Path) -> Location:
    def plant(key: str, data: bytes) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.chmod(0o644)  # objects are read-only; their owner can still replace them
        path.write_bytes(data)

    return Location(str(root), {}, lambda key: (root / key).read_bytes(), plant)


def s3_location(url: str, options: dict[str, Any], client: Any) -> Location:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")

    def read(key: str) -> bytes:
        body: bytes = client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
        return body

    def plant(key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)

    return Location(url, options, read, plant)


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "local":
        return local_location(tmp_path / "store")
    return s3_location(
        request.getfixturevalue("s3_url"),
        request.getfixturevalue("s3_storage_options"),
        request.getfixturevalue("s3_client"),
    )


@pytest.fixture
def s3(s3_url: str, s3_storage_options: dict[str, Any], s3_client: Any) -> Location:
    return s3_location(s3_url, s3_storage_options, s3_client)


def manifest_object(key: ds.NodeKey) -> str:
    return manifest_key(key)


def sample(store: ds.Store, note: str = "init") -> ds.Manifest:
    return ds.Manifest({"w": store.put(b"weights" * 100)}, {"description": note, "n": 1})


def forge(raw: bytes, payload: bytes) -> bytes:
    """``raw`` (a stored, signed manifest) with another payload and its recomputed checksum."""
    return raw[:8] + blake3(payload).digest() + raw[40 : 40 + SIGNATURE_SIZE] + payload


def refused_as_untrusted(store: ds.Store, key: ds.NodeKey, why: str) -> ds.UntrustedError:
    """The manifest under ``key`` is no hit, and reading it raises UntrustedError saying ``why``."""
    assert store.manifests([key]) == {}
    assert store.missing([key]) == [key]
    with pytest.raises(ds.UntrustedError) as caught:
        store.get_manifest(key)
    assert caught.value.key == key.hex and why in str(caught.value)
    problems = store.verify().problems
    assert len(problems) == 1 and key.hex in problems[0]
    return caught.value


# -- signed manifests ------------------------------------------------------------------------------


def test_signed_commit_round_trips(location: Location) -> None:
    store = location.open(lab_key=KEY)
    assert store.signs
    key = ds.node_key("trust", {"case": "round trip"})
    manifest = sample(store)
    assert store.commit(key, manifest).won

    raw = location.read(manifest_object(key))
    assert raw[:8] == b"DAGM\x01\x01\x00\x00"  # version 1, flags: signed
    frame = Frame.parse(raw, key="m")
    assert frame.payload == manifest.payload() and frame.signature is not None
    assert ds.LabKey(KEY).verifies(key, frame.payload, frame.signature)
    assert ds.Manifest.decode(raw, key="m") == manifest  # the signature is not the value

    for reader in (store, location.open(lab_key=KEY, require_signatures=True), location.open()):
        assert reader.get_manifest(key) == manifest
        assert reader.manifests([key]) == {key: manifest}
        assert reader.verify().ok
    assert not store.commit(key, sample(store, "late")).won  # the loser reads the signed winner

    # Without a lab key nothing changes: unsigned manifests are the bytes they always were.
    keyless = location.open()
    plain = ds.node_key("trust", {"case": "unsigned"})
    keyless.commit(plain, manifest)
    payload = manifest.payload()
    expected = b"DAGM\x01\x00\x00\x00" + blake3(payload).digest() + payload
    assert location.read(manifest_object(plain)) == expected == manifest.encode()


def test_tampered_payload_with_a_recomputed_checksum_is_refused(
    location: Location, caplog: pytest.LogCaptureFixture
) -> None:
    store = location.open(lab_key=KEY)  # S3: signatures required; local: checked when present
    key = ds.node_key("trust", {"case": "tampered"})
    store.commit(key, sample(store))
    raw = location.read(manifest_object(key))
    evil = ds.Manifest({"w": store.put(b"evil" * 100)}, {"description": "init", "n": 1})
    forged = forge(raw, evil.payload())
    assert ds.Manifest.decode(forged, key="m") == evil  # the checksum alone cannot tell
    location.plant(manifest_object(key), forged)

    with caplog.at_level(logging.WARNING, logger="dagger_store"):
        refused_as_untrusted(location.open(lab_key=KEY), key, "does not match the lab key")
    assert key.hex in caplog.text  # skipped as a hit, but never silently
    with pytest.raises(ds.UntrustedError):  # a recompute loses the commit and reads the forgery
        location.open(lab_key=KEY).commit(key, sample(store))

    # A forger who does not recompute the checksum is caught by it, as before.
    location.plant(manifest_object(key), raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(ds.IntegrityError):
        location.open(lab_key=KEY).get_manifest(key)


def test_unsigned_manifest_is_refused_when_signatures_are_required(location: Location) -> None:
    key = ds.node_key("trust", {"case": "unsigned"})
    keyless = location.open()
    manifest = sample(keyless)
    keyless.commit(key, manifest)

    required = location.open(lab_key=KEY, require_signatures=True)
    refused_as_untrusted(required, key, "is not signed")
    with pytest.raises(ds.UntrustedError, match="not signed"):
        required.commit(key, manifest)  # the loser's read is checked too
    # Required only where asked (remote stores ask by default): locally, unsigned still loads.
    if not location.url.startswith("s3://"):
        assert location.open(lab_key=KEY).get_manifest(key) == manifest

    # Stripping a signature (flag cleared, HMAC cut out) makes a valid unsigned manifest: refused.
    signed = ds.node_key("trust", {"case": "stripped"})
    required.commit(signed, manifest)
    raw = location.read(manifest_object(signed))
    stripped = raw[:5] + b"\x00" + raw[6:40] + raw[40 + SIGNATURE_SIZE :]
    assert ds.Manifest.decode(stripped, key="m") == manifest
    location.plant(manifest_object(signed), stripped)
    with pytest.raises(ds.UntrustedError, match="not signed"):
        location.open(lab_key=KEY, require_signatures=True).get_manifest(signed)


def test_manifest_signed_with_another_key_is_refused(location: Location) -> None:
    key = ds.node_key("trust", {"case": "other key"})
    other = location.open(lab_key=OTHER_KEY)
    manifest = sample(other)
    other.commit(key, manifest)
    assert other.get_manifest(key) == manifest
    refused_as_untrusted(location.open(lab_key=KEY), key, "signed with another lab key")

    # A signature covers its node key: a signed manifest copied under another key is refused.
    copy = ds.node_key("trust", {"case": "copied"})
    location.plant(manifest_object(copy), location.read(manifest_object(key)))
    with pytest.raises(ds.UntrustedError, match="does not match"):
        location.open(lab_key=OTHER_KEY).get_manifest(copy)


def test_a_damaged_signed_frame_is_an_integrity_error(tmp_path: Path) -> None:
    store = ds.open_store(tmp_path / "store", lab_key=KEY)
    key = ds.node_key("trust", {"case": "damaged"})
    store.commit(key, sample(store))
    raw = (tmp_path / "store" / manifest_object(key)).read_bytes()
    damaged = {
        "flag cleared": raw[:5] + b"\x00" + raw[6:],
        "unknown flag": raw[:5] + b"\x03" + raw[6:],
        "reserved byte": raw[:6] + b"\x01" + raw[7:],
        "signature cut short": raw[:50],
    }
    for what, data in damaged.items():
        with pytest.raises(ds.IntegrityError):
            ds.Manifest.decode(data, key=what)
    # An intact frame with a flipped signature byte parses; only the lab key can tell.
    flipped = raw[:41] + bytes([raw[41] ^ 1]) + raw[42:]
    frame = Frame.parse(flipped, key="flipped")
    assert frame.signature is not None
    assert not ds.LabKey(KEY).verifies(key, frame.payload, frame.signature)


# -- who is trusted --------------------------------------------------------------------------------


def test_who_is_trusted_by_default(tmp_path: Path, s3: Location) -> None:
    local = local_location(tmp_path / "mine")
    cases = {
        "a local store you created": (local.open(), True, False),
        "local, with a lab key": (local.open(lab_key=KEY), True, False),
        "local, trust=False": (local.open(trust=False), False, False),
        "memory": (ds.open_store(f"memory://trust-{uuid.uuid4().hex}"), True, False),
        "S3": (s3.open(), False, False),
        "S3 with a lab key": (s3.open(lab_key=KEY), True, True),
        "S3 with a lab key, signatures not required": (
            s3.open(lab_key=KEY, require_signatures=False),
            False,
            False,
        ),
        "S3, trust=True": (s3.open(trust=True), True, False),
        "S3 with a read-through cache": (s3.open(cache_dir=tmp_path / "cache"), False, False),
    }
    for what, (store, trusted, required) in cases.items():
        assert (store.trusted, store.require_signatures) == (trusted, required), what


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown the marker"
)
def test_a_local_store_someone_else_created_is_not_trusted(tmp_path: Path) -> None:
    ds.open_store(tmp_path / "theirs").close()
    os.chown(tmp_path / "theirs" / "dagger-store", 65534, 65534)  # nobody's now
    assert not ds.open_store(tmp_path / "theirs").trusted
    assert ds.open_store(tmp_path / "theirs", trust=True).trusted
    assert ds.open_store(tmp_path / "theirs", lab_key=KEY, require_signatures=True).trusted


def test_the_lab_key_comes_from_the_argument_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = tmp_path / "store"

    def signer(store: ds.Store, case: str) -> str:
        """Which key signed a fresh commit: KEY, OTHER_KEY or neither."""
        node = ds.node_key("trust", {"case": case})
        store.commit(node, sample(store))
        frame = Frame.parse((url / manifest_object(node)).read_bytes(), key=case)
        if frame.signature is None:
            return "unsigned"
        for name, text in (("KEY", KEY), ("OTHER_KEY", OTHER_KEY)):
            if ds.LabKey(text).verifies(node, frame.payload, frame.signature):
                return name
        return "unknown"

    assert signer(ds.open_store(url), "none") == "unsigned"
    monkeypatch.setenv(LAB_KEY_ENV, KEY)
    assert signer(ds.open_store(url), "env") == "KEY"
    assert signer(ds.open_store(url, lab_key=OTHER_KEY), "argument beats env") == "OTHER_KEY"
    monkeypatch.setenv(LAB_KEY_ENV, "")  # set but empty: as if unset
    key_file = tmp_path / "lab.key"
    key_file.write_text(OTHER_KEY + "\n")  # a final newline is not part of the key
    monkeypatch.setenv(LAB_KEY_FILE_ENV, str(key_file))
    assert signer(ds.open_store(url), "file") == "OTHER_KEY"
    assert signer(ds.open_store(url, lab_key=ds.LabKey(KEY)), "LabKey") == "KEY"

    monkeypatch.setenv(LAB_KEY_FILE_ENV, str(tmp_path / "absent.key"))
    with pytest.raises(ds.StoreOpenError, match=r"cannot read the lab key file .*absent\.key"):
        ds.open_store(url)
    monkeypatch.delenv(LAB_KEY_FILE_ENV)
    short = "hunter2-secret"
    monkeypatch.setenv(LAB_KEY_ENV, short)
    with pytest.raises(ds.StoreOpenError, match="too short") as caught:
        ds.open_store(url)
    assert short not in str(caught.value) and "DAGGER_LAB_KEY" in str(caught.value)
    monkeypatch.delenv(LAB_KEY_ENV)
    with pytest.raises(ds.StoreOpenError, match="needs the lab key"):
        ds.open_store(url, require_signatures=True)

    lab_key = ds.LabKey(KEY)
    assert KEY not in repr(lab_key) and KEY not in str(lab_key)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(lab_key)
    with pytest.raises(TypeError, match="never pickled"):  # so it never lands in a stored state
        save_attribute(ds.open_store(url), "secrets", {"key": lab_key, "n": 1})


# -- the orchestrator: pickled attributes only from trusted stores --------------------------------

UNPICKLED: list[str] = []  # every Canary that was unpickled, by label


def _revive(label: str) -> Canary:
    UNPICKLED.append(label)  # the side effect an attacker's pickle would have
    return Canary(label)


class Canary:
    """A small custom object, so stored by pickle; unpickling it leaves a trace in UNPICKLED."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __reduce__(self) -> tuple[Any, ...]:
        return (_revive, (self.label,))


class TrustState(dg.ExperimentState):
    PROPERTIES = ["seed"]
    NONHASHED_ATTRIBUTES = ["weights", "notes", "canary"]

    def initialize_state(self, **kwargs: Any) -> None:
        self.weights = np.arange(12, dtype=np.float32).reshape(3, 4) + self.seed  # ndarray
        self.notes = {"epochs": 0, "seed": self.seed}  # msgpack
        self.canary = Canary(f"seed {self.seed}")  # pickle


class Halve(dg.Recipe):
    PROPERTIES = ["step"]

    def run(self, state: TrustState) -> TrustState:
        state.weights *= 0.5
        state.notes = {**state.notes, "epochs": state.notes["epochs"] + 1}
        state.canary = Canary(f"{state.canary.label}, halved {self.step}")
        return state


@dg.Function
def canary_label(state: TrustState) -> str:
    return state.canary.label


def define(exp: dg.Experiment) -> tuple[dg.StatePromise, dg.StatePromise]:
    root = exp.spawn_new_tree(seed=1)
    child = Halve(step=1)(root)
    canary_label(child)
    return root, child


def restored(exp: dg.Experiment, key: ds.NodeKey) -> TrustState:
    (node,) = [n for n in exp.graph.nodes if n.key == key]
    state = node.restore()
    assert isinstance(state, TrustState)
    return state


def test_pickled_attributes_restore_from_a_trusted_local_store(tmp_path: Path) -> None:
    exp = dg.Experiment(tmp_path / "exp", TrustState)
    assert exp.store.trusted
    _, child = define(exp)
    report = exp.run()
    assert [r.value for r in report.results] == ["seed 1, halved 1"]
    state = restored(dg.Experiment.restore(tmp_path / "exp"), child.key)
    assert state.canary.label == "seed 1, halved 1" and UNPICKLED[-1] == state.canary.label


def test_pickled_attributes_load_from_s3_only_when_signed_or_trusted(
    tmp_path: Path, s3: Location, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "exp"
    # With the lab key (from the environment, as workers see it): signed, required, trusted.
    monkeypatch.setenv(LAB_KEY_ENV, KEY)
    exp = dg.Experiment(folder, TrustState, store=s3.url, storage_options=s3.options)
    assert exp.store.trusted and exp.store.require_signatures
    _, child = define(exp)
    assert [r.value for r in exp.run().results] == ["seed 1, halved 1"]  # Halve loaded its parent
    assert restored(dg.Experiment.restore(folder, storage_options=s3.options), child.key)

    # Without it, the same S3 store is not trusted: pickles are refused before they are read.
    monkeypatch.delenv(LAB_KEY_ENV)
    untrusted = dg.Experiment.restore(folder, storage_options=s3.options)
    assert not untrusted.store.trusted
    unpickled_before = list(UNPICKLED)
    with pytest.raises(ds.UntrustedError) as caught:
        restored(untrusted, child.key)
    assert caught.value.attribute == "canary"
    for advice in ("DAGGER_LAB_KEY", "require_signatures=True", "trust=True", "'canary'"):
        assert advice in str(caught.value)
    # A run on the untrusted store: the Function and a new recipe both need the pickle.
    again = dg.Experiment(folder, TrustState, storage_options=s3.options)
    _, child_again = define(again)
    Halve(step=2)(child_again)
    with pytest.raises(dg.RunError) as run_error:
        again.run()
    assert isinstance(run_error.value.__cause__, ds.UntrustedError)
    assert len(run_error.value.report.failed) == 1  # Halve(step=2); the Function failed too
    assert unpickled_before == UNPICKLED  # nothing was unpickled: refused before pickle ran

    # Arrays and plain data still load from the untrusted store; the error names the node.
    store = untrusted.store
    manifest = store.get_manifest(child.key)
    specs = manifest.meta["attributes"]
    weights = load_attribute(store, manifest.blobs, "weights", specs["weights"])
    np.testing.assert_array_equal(weights, (np.arange(12, dtype=np.float32).reshape(3, 4) + 1) / 2)
    notes = load_attribute(store, manifest.blobs, "notes", specs["notes"])
    assert notes == {"epochs": 1, "seed": 1}
    with pytest.raises(ds.UntrustedError) as caught:
        load_attribute(store, manifest.blobs, "canary", specs["canary"], node=child.key)
    assert caught.value.key == child.key.hex and child.key.hex in str(caught.value)
    assert unpickled_before == UNPICKLED

    # trust=True: the caller vouches for everyone who can write there.
    trusting = ds.open_store(s3.url, storage_options=s3.options, trust=True)
    assert load_state(trusting, child.key, TrustState, ()).canary.label == "seed 1, halved 1"
    assert UNPICKLED[-1] == "seed 1, halved 1"

    # Another lab's key: every manifest is refused, pickles or not.
    monkeypatch.setenv(LAB_KEY_ENV, OTHER_KEY)
    del UNPICKLED[:]
    with pytest.raises(ds.UntrustedError, match="does not match the lab key"):
        restored(dg.Experiment.restore(folder, storage_options=s3.options), child.key)
    assert UNPICKLED == []


# -- credentials never leak ------------------------------------------------------------------------


def _texts(error: BaseException) -> Iterator[str]:
    """Everything an error can show: its message, repr, attributes, chain and traceback."""
    yield "".join(traceback.format_exception(error))
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield repr(vars(current)) if hasattr(current, "__dict__") else ""
        current = current.__cause__ or current.__context__


def test_no_key_or_credential_reaches_a_stored_object_a_log_or_an_error(
    tmp_path: Path,
    s3_endpoint: str,
    s3_strict_endpoint: str,
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="dagger_store")
    caplog.set_level(logging.DEBUG, logger="dagger_orchestrate")
    access, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"s3cret-{uuid.uuid4().hex}"
    lab_key, short_key = f"labkey-{uuid.uuid4().hex}", f"short-{uuid.uuid4().hex[:6]}"
    secrets = (access, secret, lab_key, short_key)
    options = {"endpoint_url": s3_endpoint, "key": access, "secret": secret}
    bucket = f"dagger-secrets-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    work = tmp_path / "work"
    key_file = tmp_path / "keys" / "lab.key"  # the one place the key is meant to be
    key_file.parent.mkdir()
    key_file.write_text(lab_key)
    exp_url, store_url = f"s3://{bucket}/exp", f"s3://{bucket}/store"

    monkeypatch.setenv(LAB_KEY_FILE_ENV, str(key_file))
    exp = dg.Experiment(exp_url, TrustState, store=store_url, storage_options=options)
    _, child = define(exp)
    exp.run()
    errors: list[BaseException] = []

    def expect(error_type: type[BaseException], action: Callable[[], object]) -> None:
        with pytest.raises(error_type) as caught:
            action()
        errors.append(caught.value)

    expect(  # a lab key given but refused
        ds.StoreOpenError,
        lambda: ds.open_store(store_url, storage_options=options, lab_key=short_key),
    )
    monkeypatch.delenv(LAB_KEY_FILE_ENV)
    untrusted = dg.Experiment.restore(exp_url, storage_options=options)
    expect(ds.UntrustedError, lambda: restored(untrusted, child.key))
    again = dg.Experiment(exp_url, TrustState, storage_options=options)
    define(again)
    expect(dg.RunError, again.run)
    monkeypatch.setenv(LAB_KEY_ENV, OTHER_KEY)
    expect(
        ds.UntrustedError,
        lambda: restored(dg.Experiment.restore(exp_url, storage_options=options), child.key),
    )
    monkeypatch.delenv(LAB_KEY_ENV)
    expect(
        ds.StoreOpenError,
        lambda: ds.open_store(store_url, storage_options=options, require_signatures=True),
    )
    strict = {**options, "endpoint_url": s3_strict_endpoint}  # refuses these credentials
    expect(ds.StoreOpenError, lambda: ds.open_store(store_url, storage_options=strict))
    work.mkdir()
    local = ds.open_store(work / "store", lab_key=lab_key)
    leak = ds.node_key("trust", {"case": "leak"})
    local.commit(leak, sample(local))
    expect(ds.UntrustedError, lambda: ds.open_store(work / "store", lab_key=KEY).get_manifest(leak))

    stored = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", ()):
            body = s3_client.get_object(Bucket=bucket, Key=entry["Key"])["Body"]
            stored[entry["Key"]] = body.read()
    assert any(k.startswith("store/v1/manifests/") for k in stored)
    assert any(k.startswith("store/v1/experiments/") for k in stored)
    stored.update({str(p): p.read_bytes() for p in work.rglob("*") if p.is_file()})
    out, err = capfd.readouterr()
    shown = [*(t for e in errors for t in _texts(e)), caplog.text, out, err, repr(exp.store)]
    assert len(errors) == 7 and "does not match" in " ".join(str(e) for e in errors)
    for secret_text in secrets:
        for name, data in stored.items():
            assert secret_text.encode() not in data, f"{name} holds a credential"
        for text in shown:
            assert secret_text not in text
