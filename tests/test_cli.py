"""The dagger-lab command line, on a real store with a real experiment in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from toy_experiment import Prune, State, Train

import dagger_orchestrate as dg
from dagger_orchestrate.cli import main


@pytest.fixture
def lab(tmp_path: Path) -> tuple[str, dg.Experiment, dict[str, dg.StatePromise]]:
    store = str(tmp_path / "lab")
    exp = dg.Experiment(tmp_path / "pruning", state_class=State, store=store)
    root = exp.spawn_new_tree(dataset_name="digits", seed=0)
    with exp.tag("lr:0.1"):
        trained = Train(nb_epochs=1, lr=0.1)(root)
        with exp.tag("pruned"):
            pruned = Prune(fraction=0.5)(trained)
    exp.run()
    return store, exp, {"root": root, "trained": trained, "pruned": pruned}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_tree_show_du_verify(lab: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    store, exp, nodes = lab
    code, out, _ = run(capsys, "--store", store, "ls")
    assert code == 0 and out.startswith(exp.name) and "3 nodes" in out and "1 runs" in out
    code, out, _ = run(capsys, "--store", store, "tree", exp.name)
    assert code == 0 and len(out.splitlines()) == 3
    assert "Prune(fraction=0.5)  [lr:0.1, pruned]" in out and out.count("cached") == 3
    code, out, _ = run(capsys, "--store", store, "show", nodes["pruned"].key.hex[:10])
    assert code == 0 and nodes["pruned"].key.hex in out and "Prune(fraction=0.5)" in out
    assert "data" in out and "ndarray" in out and "<f4 (256, 64)" in out
    code, out, _ = run(capsys, "--store", store, "du")
    assert code == 0 and "dedup ratio" in out
    code, out, _ = run(capsys, "--store", store, "verify")
    assert code == 0 and "0 problems" in out


def test_verify_exits_1_on_a_corrupt_object(lab: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, _ = lab
    victim = next(p for p in sorted(Path(store, "v1", "blobs").rglob("*")) if p.is_file())
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(data)
    code, out, _ = run(capsys, "--store", store, "verify")
    assert code == 1 and victim.name in out and "1 problems" in out


def test_errors_have_documented_exit_codes(
    lab: tuple, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = lab
    code, _, err = run(capsys, "--store", store, "show", "ffffffffffff")
    assert code == 3 and "no node matches" in err
    code, _, err = run(capsys, "--store", store, "tree", "nobody")
    assert code == 3 and "no experiment 'nobody'" in err
    typo = str(Path(store).parent / "lba")
    code, _, err = run(capsys, "--store", typo, "ls")
    assert code == 3 and "no store at" in err and not Path(typo).exists()
    monkeypatch.delenv("DAGGER_STORE", raising=False)
    code, _, err = run(capsys, "ls")
    assert code == 2 and "--store" in err
    monkeypatch.setenv("DAGGER_STORE", store)
    code, out, _ = run(capsys, "ls")
    assert code == 0 and "pruning-" in out
    with pytest.raises(SystemExit) as info:
        main(["tree"])  # missing argument: argparse's usage error
    assert info.value.code == 2
    assert run(capsys)[0] == 2


def test_draw_says_how_to_get_dot(
    lab: tuple, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, exp, _ = lab
    if shutil.which("dot"):
        code, out, _ = run(
            capsys, "--store", store, "draw", exp.name, "-o", str(tmp_path / "t.svg")
        )
        assert "wrote" in out
        assert code == 0 and (tmp_path / "t.svg").exists()
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run(capsys, "--store", store, "draw", exp.name, "-o", str(tmp_path / "u.svg"))
    assert code == 2 and "apt-get install graphviz" in err


def test_the_console_script_is_installed(lab: tuple) -> None:
    store, exp, _ = lab
    script = Path(sys.executable).with_name("dagger-lab")
    done = subprocess.run(
        [str(script), "--store", store, "ls"], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    assert done.stdout.startswith(exp.name)
    help_text = subprocess.run([str(script), "gc", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--delete" in help_text.stdout


def test_pin_gc_unpin(lab: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    store, _, nodes = lab
    code, out, _ = run(capsys, "--store", store, "pin", "paper-fig-3", nodes["pruned"].key.hex[:8])
    assert code == 0 and "pinned 1 node(s)" in out
    code, _, err = run(capsys, "--store", store, "pin", "paper-fig-3", nodes["root"].key.hex[:8])
    assert code == 3 and "unpin" in err
    code, out, _ = run(capsys, "--store", store, "gc")  # dry run: everything is referenced
    assert code == 0 and "dry run" in out.lower()
    code, out, _ = run(capsys, "--store", store, "unpin", "paper-fig-3")
    assert code == 0 and "unpinned" in out
    code, _, err = run(capsys, "--store", store, "unpin", "paper-fig-3")
    assert code == 3
    code, out, _ = run(capsys, "--store", store, "verify")
    assert code == 0


def test_long_operations_show_progress_only_on_a_terminal(lab: tuple) -> None:
    import pty

    store, _, _ = lab
    script = str(Path(sys.executable).with_name("dagger-lab"))
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [script, "--store", store, "verify"], stderr=follower, stdout=subprocess.PIPE
        )
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0 and b"verify" in shown and b"\x1b[K" in shown
    piped = subprocess.run([script, "--store", store, "verify"], capture_output=True)
    assert piped.returncode == 0 and piped.stderr == b""  # not a terminal: no status line


def test_the_cli_takes_the_experiment_folder_a_user_has_in_hand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGGER_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    exp = dg.Experiment("exp_sync", state_class=State)  # an embedded store: exp_sync/store
    Train(nb_epochs=1, lr=0.1)(exp.spawn_new_tree(dataset_name="digits", seed=0))
    exp.run()
    assert exp.name != "exp_sync"  # the real name carries a hash of the path
    for argv in (
        ("--store", "exp_sync", "tree", "exp_sync"),  # the folder for both
        ("--store", "exp_sync", "tree", exp.name),
        ("--store", "exp_sync/store", "tree", "exp_sync"),
        ("tree", "exp_sync"),  # no store at all: the folder knows it
    ):
        code, out, err = run(capsys, *argv)
        assert (code, err) == (0, ""), argv
        assert len(out.splitlines()) == 2 and out.count("cached") == 2, argv
    code, _, err = run(capsys, "--store", "exp_sync", "tree", "no-such")
    assert code == 3 and "no experiment 'no-such'" in err and "folder" in err
    code, _, err = run(capsys, "tree", "not-a-folder")
    assert code == 2 and "no store" in err
