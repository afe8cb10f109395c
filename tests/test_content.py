"""Data by content: File and Dir as properties, keyed by what they hold, with a stat cache."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

import dagger_orchestrate as dg
import dagger_store as ds
from dagger_store import content

EXECUTED: list[str] = []


class DataState(dg.ExperimentState):
    """A root that reads its data set from a File or Dir (module level: processes import it)."""

    PROPERTIES = ["dataset_name", "data"]

    def initialize_state(self, **kwargs: Any) -> None:
        data = kwargs["data"]
        if isinstance(data, dg.File):
            self.nbytes = len(Path(data).read_bytes())
        else:
            self.nbytes = sum(p.stat().st_size for p in Path(data).rglob("*") if p.is_file())
        EXECUTED.append("init")


class Join(dg.Recipe):
    """A recipe with a File among its PROPERTIES."""

    PROPERTIES = ["extra"]

    def run(self, state: DataState) -> DataState:
        state.nbytes += len(Path(self.extra).read_bytes())
        EXECUTED.append("join")
        return state


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DAGGER_CACHE_DIR", str(tmp_path / "cache"))
    EXECUTED.clear()
    yield


def settled(path: Path, seconds_ago: float = 100.0) -> Path:
    """Give ``path`` an mtime old enough for the stat cache to vouch for it (not racily clean)."""
    when = time.time() - seconds_ago
    os.utime(path, (when, when))
    return path


def run_root(tmp_path: Path, data: Any, extra: Any = None) -> dg.RunReport:
    exp = dg.Experiment(tmp_path / "exp", state_class=DataState, store=str(tmp_path / "store"))
    root = exp.spawn_new_tree(dataset_name="digits", data=data)
    if extra is not None:
        Join(extra=extra)(root)
    return exp.run()


def test_a_changed_file_recomputes_and_an_unchanged_one_is_a_hit(tmp_path: Path) -> None:
    data = tmp_path / "train.npy"
    data.write_bytes(b"version one")
    first = run_root(tmp_path, dg.File(data))
    assert len(first.executed) == 1 and EXECUTED == ["init"]
    again = run_root(tmp_path, dg.File(data))
    assert again.executed == () and again.cached == first.executed
    data.write_bytes(b"version two")  # same size, other bytes
    changed = run_root(tmp_path, dg.File(data))
    assert len(changed.executed) == 1 and changed.executed != first.executed
    data.write_bytes(b"version one")
    back = run_root(tmp_path, dg.File(data))
    assert back.executed == () and back.cached == first.executed
    assert EXECUTED == ["init", "init"]


def test_identity_is_the_content_not_the_path(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    data = tmp_path / "a" / "train.npy"
    data.write_bytes(b"the data set")
    first = run_root(tmp_path, dg.File(data))
    moved = tmp_path / "b" / "renamed.npy"
    moved.parent.mkdir()
    data.rename(moved)
    again = run_root(tmp_path, dg.File(moved))
    assert again.executed == () and again.cached == first.executed
    copied = tmp_path / "copy.npy"
    copied.write_bytes(moved.read_bytes())
    # Unequal values (the path is what a reader opens), one identity.
    assert dg.File(moved) != dg.File(copied)
    assert ds.node_key("k", {"x": dg.File(moved)}) == ds.node_key("k", {"x": dg.File(copied)})


def test_a_file_property_of_a_recipe_recomputes_only_its_node(tmp_path: Path) -> None:
    data, extra = tmp_path / "data.bin", tmp_path / "labels.bin"
    data.write_bytes(b"data")
    extra.write_bytes(b"labels")
    first = run_root(tmp_path, dg.File(data), dg.File(extra))
    assert len(first.executed) == 2
    extra.write_bytes(b"labels, fixed")
    changed = run_root(tmp_path, dg.File(data), dg.File(extra))
    assert len(changed.executed) == 1 and len(changed.cached) == 1 and EXECUTED[-1] == "join"


def test_records_and_the_tree_show_the_repr(tmp_path: Path) -> None:
    data = tmp_path / "train.npy"
    data.write_bytes(b"x")
    run_root(tmp_path, dg.File(data))
    exp = dg.Experiment.restore(tmp_path / "exp", slim=True)
    assert f"data=File({str(data)!r})" in str(exp.graph)
    state = exp.graph.nodes[0].restore()
    assert state.data == dg.File(data) and state.data.digest == dg.File(data).digest


def test_a_changed_dir_recomputes(tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "0.png").write_bytes(b"zero")
    (folder / "labels.csv").write_bytes(b"0\n")
    first = run_root(tmp_path, dg.Dir(folder))
    assert len(first.executed) == 1
    assert run_root(tmp_path, dg.Dir(folder)).executed == ()
    (folder / "train" / "1.png").write_bytes(b"one")
    added = run_root(tmp_path, dg.Dir(folder))
    assert len(added.executed) == 1
    (folder / "train" / "1.png").unlink()
    assert run_root(tmp_path, dg.Dir(folder)).cached == first.executed
    (folder / "labels.csv").write_bytes(b"1\n")
    assert len(run_root(tmp_path, dg.Dir(folder)).executed) == 1


def test_dir_records_every_entry_and_only_relative_paths(tmp_path: Path) -> None:
    def make(root: Path) -> Path:
        (root / "sub").mkdir(parents=True)
        (root / "a.txt").write_bytes(b"a")
        (root / "sub" / "b.txt").write_bytes(b"bb")
        return root

    one, two = dg.Dir(make(tmp_path / "one")), dg.Dir(make(tmp_path / "elsewhere" / "two"))
    assert (one.digest, one.size, one.algorithm) == (two.digest, 3, "blake3-dir")

    def digest_after(change: Any) -> str:
        root = make(tmp_path / f"case-{len(list(tmp_path.iterdir()))}")
        change(root)
        return dg.Dir(root).digest

    changed = {
        "hidden file": digest_after(lambda r: (r / ".hidden").write_bytes(b"")),
        "empty dir": digest_after(lambda r: (r / "empty").mkdir()),
        "renamed": digest_after(lambda r: (r / "a.txt").rename(r / "c.txt")),
        "moved": digest_after(lambda r: (r / "a.txt").rename(r / "sub" / "a.txt")),
    }
    assert one.digest not in changed.values() and len(set(changed.values())) == len(changed)


def test_symlinks_are_followed_and_broken_ones_or_loops_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "x.bin").write_bytes(b"x")
    (real / "y.bin").write_bytes(b"y")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "sub").symlink_to(real / "sub")  # a symlinked directory is walked
    (linked / "y.bin").symlink_to(real / "y.bin")  # a symlinked file counts by its content
    assert dg.Dir(linked).digest == dg.Dir(real).digest
    assert dg.File(linked / "y.bin").digest == dg.File(real / "y.bin").digest
    (linked / "gone.bin").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="broken symlink") as info:
        dg.Dir(linked)
    assert info.value.filename == str(linked / "gone.bin")
    (real / "sub" / "up").symlink_to(real)
    with pytest.raises(ValueError, match="loop"):
        dg.Dir(real)


def test_special_files_are_refused_not_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    with pytest.raises(ValueError, match="FIFO") as info:
        dg.Dir(folder)
    assert str(folder / "pipe") in str(info.value)
    with pytest.raises(ValueError, match="FIFO"):
        dg.File(folder / "pipe")


def test_a_missing_path_is_an_error_naming_it_when_defined(tmp_path: Path) -> None:
    missing = tmp_path / "data" / "train.npy"
    with pytest.raises(FileNotFoundError) as info:
        dg.File(missing)
    assert str(missing) in str(info.value) and info.value.filename == str(missing)
    with pytest.raises(FileNotFoundError, match="no such file"):
        dg.Dir(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="use Dir"):
        dg.File(tmp_path / "folder")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="use File"):
        dg.Dir(tmp_path / "file")
    with pytest.raises(ValueError, match="s3://"):
        dg.File("gs://bucket/key")
    with pytest.raises(ValueError, match="storage_options"):
        dg.File(tmp_path / "file", storage_options={"anon": True})


def test_values_are_path_like_immutable_picklable_and_never_hash_again(tmp_path: Path) -> None:
    data = tmp_path / "train.npy"
    data.write_bytes(b"payload")
    value = dg.File(data)
    assert os.fspath(value) == value.path == str(data)
    assert repr(value) == f"File({str(data)!r})"
    assert value.digest == blake3(b"payload").hexdigest() and value.size == 7  # b3sum agrees
    assert Path(value).read_bytes() == b"payload"
    with pytest.raises(AttributeError, match="immutable"):
        value.path = "elsewhere"  # type: ignore[misc]
    folder = dg.Dir(tmp_path)
    data.unlink()  # nothing to hash any more: the copies carry the digest
    for original in (value, folder):
        for clone in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
            assert clone == original and type(clone) is type(original)
            assert (clone.digest, clone.size, clone.path) == (
                original.digest,
                original.size,
                original.path,
            )
            assert ds.node_key("k", {"x": clone}) == ds.node_key("k", {"x": original})
    assert hash(pickle.loads(pickle.dumps(value))) == hash(value)


def test_file_and_dir_never_share_a_key(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"")
    keys = {ds.node_key("k", {"x": v}) for v in (dg.File(tmp_path / "f"), dg.Dir(tmp_path / "d"))}
    keys.add(ds.node_key("k", {"x": str(tmp_path / "f")}))
    assert len(keys) == 3


# --- the stat cache ----------------------------------------------------------------------------


def cache_entries(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache" / "stat-cache").rglob("*") if p.is_file()]


def test_an_unchanged_file_is_answered_by_the_stat_cache(tmp_path: Path) -> None:
    data = tmp_path / "big.bin"
    data.write_bytes(b"a" * 1000)
    settled(data)
    first = dg.File(data).digest
    (entry,) = cache_entries(tmp_path)
    assert entry.parent.parent == tmp_path / "cache" / "stat-cache" and len(entry.parent.name) == 2
    record = json.loads(entry.read_text())
    assert record["blake3"] == first and record["path"] == os.path.realpath(data)
    # Evidence the second lookup reads the entry instead of the file: a planted digest comes back.
    planted = "0" * 64
    entry.write_text(json.dumps({**record, "blake3": planted}))
    assert dg.File(data).digest == planted
    # ...in another process too: the cache is shared.
    script = "import sys, dagger_store as ds; print(ds.File(sys.argv[1]).digest)"
    other = subprocess.run(
        [sys.executable, "-c", script, str(data)], capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() == planted
    # Same size, new mtime: hashed again, and the entry replaced.
    data.write_bytes(b"b" * 1000)
    settled(data, seconds_ago=50)
    assert dg.File(data).digest == blake3(b"b" * 1000).hexdigest()
    assert json.loads(entry.read_text())["blake3"] == blake3(b"b" * 1000).hexdigest()


def test_the_stat_cache_trusts_no_changed_stamp(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"one")
    settled(data)
    dg.File(data)
    (entry,) = cache_entries(tmp_path)
    planted = json.dumps({**json.loads(entry.read_text()), "blake3": "0" * 64})
    mtime = data.stat().st_mtime_ns
    # Rewritten with its mtime restored (rsync -t, touch -d): ctime still moved.
    entry.write_text(planted)
    data.write_bytes(b"two")
    os.utime(data, ns=(mtime, mtime))
    assert dg.File(data).digest == blake3(b"two").hexdigest()
    # Replaced by another file (a new inode) of the same size and times.
    entry.write_text(planted)
    replacement = tmp_path / "replacement.bin"
    replacement.write_bytes(b"two")
    os.utime(replacement, ns=(mtime, mtime))
    replacement.replace(data)
    assert dg.File(data).digest == blake3(b"two").hexdigest()
    # A torn or foreign entry is a miss, never an error.
    entry.write_text("{not json")
    assert dg.File(data).digest == blake3(b"two").hexdigest()


def test_a_just_written_file_is_not_vouched_for_by_its_stat(tmp_path: Path) -> None:
    data = tmp_path / "fresh.bin"
    data.write_bytes(b"fresh")  # mtime now: another write this tick could keep size and times
    assert dg.File(data).digest == blake3(b"fresh").hexdigest()
    assert cache_entries(tmp_path) == []


def test_an_unwritable_cache_costs_only_speed(tmp_path: Path, monkeypatch: Any) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    monkeypatch.setenv("DAGGER_CACHE_DIR", str(blocker))
    data = tmp_path / "data.bin"
    data.write_bytes(b"data")
    settled(data)
    assert dg.File(data).digest == blake3(b"data").hexdigest()


def test_dir_files_go_through_the_stat_cache(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / name).write_bytes(name.encode())
        settled(folder / name)
    before = dg.Dir(folder).digest
    assert len(cache_entries(tmp_path)) == 2
    for entry in cache_entries(tmp_path):
        record = json.loads(entry.read_text())
        entry.write_text(json.dumps({**record, "blake3": "1" * 64}))
    assert dg.Dir(folder).digest != before  # the planted digests were used: nothing re-read


# --- S3 ----------------------------------------------------------------------------------------


def test_an_s3_file_is_keyed_by_its_etag(
    s3_bucket: str, s3_client: Any, s3_storage_options: dict[str, Any]
) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="data/train.npy", Body=b"version one")
    url = f"s3://{s3_bucket}/data/train.npy"
    first = dg.File(url, storage_options=s3_storage_options)
    etag = s3_client.head_object(Bucket=s3_bucket, Key="data/train.npy")["ETag"].strip('"')
    assert (first.algorithm, first.digest, first.size) == ("s3-etag", etag, 11)
    assert os.fspath(first) == url and repr(first) == f"File({url!r})"
    assert first.storage_options == s3_storage_options
    s3_client.put_object(Bucket=s3_bucket, Key="data/train.npy", Body=b"version two")
    second = dg.File(url, storage_options=s3_storage_options)
    assert second.digest != first.digest
    assert ds.node_key("k", {"x": second}) != ds.node_key("k", {"x": first})
    s3_client.put_object(Bucket=s3_bucket, Key="data/train.npy", Body=b"version one")
    assert ds.node_key("k", {"x": dg.File(url, storage_options=s3_storage_options)}) == (
        ds.node_key("k", {"x": first})
    )
    clone = pickle.loads(pickle.dumps(first))  # credentials never ride along in a pickle
    assert clone == first and clone.storage_options == {}
    with pytest.raises(FileNotFoundError) as info:
        dg.File(f"s3://{s3_bucket}/data/missing.npy", storage_options=s3_storage_options)
    assert "data/missing.npy" in str(info.value)
    with pytest.raises(IsADirectoryError, match="use Dir"):
        dg.File(f"s3://{s3_bucket}/data", storage_options=s3_storage_options)


def test_an_s3_prefix_is_keyed_by_its_listing(
    s3_bucket: str, s3_client: Any, s3_storage_options: dict[str, Any]
) -> None:
    for key in ("digits/train/0.png", "digits/labels.csv", "digits2/other.csv"):
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    url = f"s3://{s3_bucket}/digits"
    first = dg.Dir(url, storage_options=s3_storage_options)
    assert first.algorithm == "s3-etag-dir"
    assert first.size == len(b"digits/train/0.png") + len(b"digits/labels.csv")  # not digits2/
    assert dg.Dir(url + "/", storage_options=s3_storage_options).digest == first.digest
    s3_client.put_object(Bucket=s3_bucket, Key="digits/train/1.png", Body=b"one")
    added = dg.Dir(url, storage_options=s3_storage_options)
    assert added.digest != first.digest
    s3_client.delete_object(Bucket=s3_bucket, Key="digits/train/1.png")
    assert dg.Dir(url, storage_options=s3_storage_options).digest == first.digest
    # Relative keys only: the same objects under another prefix are the same data set.
    for key in ("digits/train/0.png", "digits/labels.csv"):
        body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        s3_client.put_object(Bucket=s3_bucket, Key="copy/" + key[len("digits/") :], Body=body)
    copied = dg.Dir(f"s3://{s3_bucket}/copy", storage_options=s3_storage_options)
    assert copied.digest == first.digest
    with pytest.raises(FileNotFoundError, match="no object under"):
        dg.Dir(f"s3://{s3_bucket}/nothing", storage_options=s3_storage_options)
    with pytest.raises(NotADirectoryError, match="use File"):
        dg.Dir(f"s3://{s3_bucket}/digits/labels.csv", storage_options=s3_storage_options)


def test_an_experiment_rooted_in_s3_data(
    tmp_path: Path, s3_bucket: str, s3_client: Any, s3_storage_options: dict[str, Any]
) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="train.npy", Body=b"one")
    url = f"s3://{s3_bucket}/train.npy"

    def run() -> dg.RunReport:
        exp = dg.Experiment(tmp_path / "exp", state_class=Tally, store=str(tmp_path / "store"))
        exp.spawn_new_tree(data=dg.File(url, storage_options=s3_storage_options))
        return exp.run()

    first = run()
    assert len(first.executed) == 1 and run().executed == ()
    s3_client.put_object(Bucket=s3_bucket, Key="train.npy", Body=b"two")
    assert len(run().executed) == 1


class Tally(dg.ExperimentState):
    PROPERTIES = ["data"]

    def initialize_state(self, **kwargs: Any) -> None:
        self.size = kwargs["data"].size


def test_both_packages_export_the_same_values() -> None:
    assert dg.File is ds.File is content.File and dg.Dir is ds.Dir is content.Dir


def test_a_child_of_a_file_root_on_an_untrusted_store(
    tmp_path: Path, s3_url: str, s3_storage_options: dict[str, Any]
) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"data")
    exp = dg.Experiment(
        tmp_path / "exp", state_class=DataState, store=s3_url, storage_options=s3_storage_options
    )
    root = exp.spawn_new_tree(dataset_name="x", data=dg.File(data))
    Join(extra=dg.File(data))(root)
    assert not exp.store.trusted
    assert len(exp.run().executed) == 2  # the child loaded its parent's File: no pickle
    spec = exp.store.get_manifest(root.key).meta["attributes"]["data"]
    assert spec["codec"] == "content" and spec["kind"] == "file"
    assert exp.graph.root.restore().data == dg.File(data)


def test_a_bare_path_is_refused_with_a_pointer_to_file(tmp_path: Path) -> None:
    with pytest.raises(ds.UnencodableValueError, match=r"File\(path\) or Dir\(path\)"):
        ds.node_key("k", {"x": tmp_path})
