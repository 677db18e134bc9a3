"""storage: the same writes on a local folder and on a bucket (the local Cloud Storage emulator)."""

import os
import subprocess
import sys

import pytest
from etils import epath

from ablate_jax import storage


@pytest.fixture(params=["local", "bucket"])
def root(request, tmp_path):
    if request.param == "local":
        return tmp_path / "root"
    bucket = request.getfixturevalue("gcs_bucket")
    return f"{bucket}/storage/{request.node.name.replace('[', '-').rstrip(']')}"


def test_path_is_absolute_locally_and_a_url_remotely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.path("runs/x") == tmp_path / "runs" / "x"
    url = storage.path("gs://b/runs/x")
    assert isinstance(url, epath.Path) and os.fspath(url) == "gs://b/runs/x"
    assert storage.is_remote("gs://b") and not storage.is_remote("/gs/b") and not storage.is_remote("gs:/b")


def test_write_bytes_replaces_whole_and_leaves_nothing_beside(root):
    folder = storage.path(root)
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(folder / "a.json", b"old")
    storage.write_text(folder / "a.json", "new")
    assert (folder / "a.json").read_text() == "new"
    assert storage.size(folder / "a.json") == 3
    assert [p.name for p in folder.iterdir()] == ["a.json"]


def test_move_puts_a_local_file_in_place(root, tmp_path):
    folder = storage.path(root)
    with storage.staging(folder, ".stage-") as stage:
        (stage / "grid.png").write_bytes(b"png")
        folder.mkdir(parents=True, exist_ok=True)
        storage.move(stage / "grid.png", folder / "grid.png")
        assert not (stage / "grid.png").exists()
    assert not stage.exists()
    assert (folder / "grid.png").read_bytes() == b"png"
    assert [p.name for p in folder.iterdir()] == ["grid.png"]


def test_replace_dir_swaps_a_whole_folder(root):
    folder = storage.path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for version, files in (("1", ["x.txt", "sub/y.txt", "done.json"]), ("2", ["z.txt", "done.json"])):
        with storage.staging(folder, ".stage-") as stage:
            for name in files:
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                (stage / name).write_text(version)
            storage.replace_dir(stage, folder / "out", last="done.json")
    out = folder / "out"
    assert sorted(p.name for p in out.iterdir()) == ["done.json", "z.txt"]  # nothing of version 1 is left
    assert (out / "done.json").read_text() == "2" and (out / "z.txt").read_text() == "2"
    assert sorted(p.name for p in folder.iterdir()) == ["out"]


def test_another_process_s_new_file_is_seen_after_a_listing(gcs_bucket):
    # A process lists a folder, another host adds a file to it: the first must see the file
    # (a multi-host run's anchor shards and checkpoint folders).
    folder = storage.path(f"{gcs_bucket}/storage/listing")
    storage.write_text(folder / "first.txt", "1")
    assert [p.name for p in folder.iterdir()] == ["first.txt"]
    code = "from etils import epath; import sys; epath.Path(sys.argv[1]).write_text('2')"
    subprocess.run([sys.executable, "-c", code, os.fspath(folder / "second.txt")], check=True, timeout=120)
    assert (folder / "second.txt").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["first.txt", "second.txt"]
