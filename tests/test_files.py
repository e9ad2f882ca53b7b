"""The file layer behaves the same on local disks and on a non-local file system (ram://)."""

import os
import signal
import uuid

import pytest

from sdedit_jax.util import files


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"ram://test-files-{uuid.uuid4().hex}/root"


def test_publish_read_list_walk_glob_remove(root):
    files.publish_bytes(files.join(root, "a", "x.txt"), b"one")
    files.publish_bytes(files.join(root, "a", "b", "y.bin"), b"\x00\x01")
    files.publish_bytes(files.join(root, "a", "x.txt"), b"two")  # replaces
    assert files.read_bytes(files.join(root, "a", "x.txt")) == b"two"
    assert files.read_text(files.join(root, "a", "x.txt")) == "two"
    assert files.size(files.join(root, "a", "b", "y.bin")) == 2
    assert files.listdir(files.join(root, "a")) == ["b", "x.txt"]
    assert files.isdir(files.join(root, "a", "b"))
    assert not files.isdir(files.join(root, "a", "x.txt"))
    assert files.isfile(files.join(root, "a", "x.txt"))
    walked = [
        (files.relpath(d, root) if d != root else ".", sorted(s), sorted(f))
        for d, s, f in files.walk(root)
    ]
    assert [(d.replace(os.sep, "/"), s, f) for d, s, f in walked] == [
        (".", ["a"], []),
        ("a", ["b"], ["x.txt"]),
        ("a/b", [], ["y.bin"]),
    ]
    assert files.glob(files.join(root, "a", "*.txt")) == [files.join(root, "a", "x.txt")]
    with files.open_file(files.join(root, "a", "x.txt")) as f:
        assert f.read() == b"two"
    files.remove(files.join(root, "a", "x.txt"))
    assert not files.exists(files.join(root, "a", "x.txt"))
    with pytest.raises(FileNotFoundError, match="x.txt"):
        files.read_bytes(files.join(root, "a", "x.txt"))
    files.rmtree(root)
    assert not files.exists(files.join(root, "a", "b", "y.bin"))


def test_local_publication_leaves_the_target_whole_on_failure(tmp_path, monkeypatch):
    target = str(tmp_path / "t.txt")
    files.publish_bytes(target, b"old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.publish_bytes(target, b"new", tag="p00001")
    assert open(target, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["t.txt"]  # the temporary was removed


def test_temp_names_are_recognised_by_tag():
    name = os.path.basename(files.temp_name("/x/out.png", "p00002"))
    assert files.is_temp_name(name) and files.is_temp_name(name, "p00002")
    assert not files.is_temp_name(name, "p00003")
    assert not files.is_temp_name("out.png")


def test_paths_of_urls_and_local_paths():
    assert files.is_local("runs/x") and files.is_local("file:///tmp/x")
    assert not files.is_local("gs://bucket/run") and files.scheme("gs://b") == "gs"
    assert files.join("gs://b/run", "t0_0.5", "x.png") == "gs://b/run/t0_0.5/x.png"
    assert files.dirname("gs://b/run/x.png") == "gs://b/run"
    assert files.basename("gs://b/run/") == "run"
    assert files.abspath("gs://b/x") == "gs://b/x"
    assert files.relpath("ram://r/a/b.png", "ram://r") == "a/b.png"


def test_gs_without_credentials_fails_at_once_and_creates_nothing_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(
        files.StorageError,
        match=r"gs://sdedit-no-such-bucket/run: cannot write "
        r"here: .*GOOGLE_APPLICATION_CREDENTIALS",
    ):
        files.check_writable("gs://sdedit-no-such-bucket/run")
    assert os.listdir(tmp_path) == []


def test_join_restarts_at_a_url_component():
    assert files.join("/data/manifests", "gs://b/x.png") == "gs://b/x.png"
    assert files.join("ram://r", "a", "gs://b/c", "d.png") == "gs://b/c/d.png"
    assert files.join("/data", "sub", "/abs.png") == "/abs.png"


def test_empty_content_is_published(root):
    files.publish_chunks(files.join(root, "empty.jsonl"), iter([]))
    assert files.read_bytes(files.join(root, "empty.jsonl")) == b""


def test_image_folders_list_and_load_on_any_file_system(root):
    import io

    import numpy as np
    from PIL import Image

    from sdedit_jax.data import images

    for name, value in (("b/two.png", 200), ("a.png", 100), ("notes.txt", 0)):
        buffer = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
        files.publish_bytes(files.join(root, "imgs", name), buffer.getvalue())
    folder = files.join(root, "imgs")
    assert images.list_image_files(folder) == [
        files.join(folder, "a.png"),
        files.join(folder, "b", "two.png"),
    ]
    assert images.load_image_folder(folder)[:, 0, 0, 0].tolist() == [100, 200]


def test_a_folder_is_published_whole_and_only_dead_publications_are_cleaned(tmp_path):
    out = str(tmp_path / "m")
    stale = files.temp_name(out, "new")  # what a killed publication leaves: unlocked
    os.makedirs(stale)
    open(os.path.join(stale, "weights"), "wb").write(b"\0" * 1000)
    with files.publish_folder(out) as live:
        assert not os.path.exists(stale)  # removed before the new folder is filled
        open(os.path.join(live, "a"), "w").write("1")
        files.remove_stale_folders(out)  # another convert's clean-up: this one is alive
        assert os.listdir(live) == ["a"] and not os.path.exists(out)
    assert os.listdir(tmp_path) == ["m"] and os.listdir(out) == ["a"]

    with pytest.raises(FileExistsError, match="m: already exists"):
        with files.publish_folder(out):
            pass
    with pytest.raises(RuntimeError), files.publish_folder(out, replace=True) as failed:
        open(os.path.join(failed, "b"), "w").write("2")
        raise RuntimeError("the conversion failed")
    assert os.listdir(tmp_path) == ["m"] and os.listdir(out) == ["a"]  # nothing changed
    with files.publish_folder(out, replace=True) as new:
        open(os.path.join(new, "b"), "w").write("2")
    assert os.listdir(tmp_path) == ["m"] and os.listdir(out) == ["b"]


def test_reads_refuse_fifos_and_devices_without_blocking(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    def blocked(*_):
        raise TimeoutError("a read blocked")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)
    try:
        for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
            for read in (files.read_bytes, files.sha256, lambda p: list(files.read_lines(p))):
                with pytest.raises(files.NotRegularFile, match=f"{path}: is {kind}"):
                    read(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
