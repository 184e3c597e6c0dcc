"""Atomic writes: all or nothing, with ordinary file permissions."""

import os
import stat

import pytest

from s2ft.io import atomic_write, atomic_write_text


def test_atomic_write_text_writes_with_umask_mode(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "hello")
    assert path.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["a.txt"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_ordinary_modes_open_up_private_folders_and_files(tmp_path):
    import tempfile

    from s2ft.io import file_mode, folder_mode, ordinary_modes

    old = os.umask(0o022)
    try:
        root = tempfile.mkdtemp(dir=tmp_path)  # 0700
        os.mkdir(os.path.join(root, "sub"), 0o700)
        fd, private = tempfile.mkstemp(dir=os.path.join(root, "sub"))  # 0600
        os.close(fd)
        ordinary_modes(root)
        assert (file_mode(), folder_mode()) == (0o644, 0o755)
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(os.path.join(root, "sub")).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o644
    finally:
        os.umask(old)


def test_storage_problem_names_a_full_disk_and_nothing_else():
    import errno

    from s2ft.io import storage_problem

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/model.safetensors")
    assert storage_problem(full) == "the disk is full (No space left on device: out/model.safetensors)"
    assert storage_problem(OSError(errno.EDQUOT, "quota")).startswith("the disk quota is exceeded")
    assert storage_problem(OSError(errno.EROFS, "ro")).startswith("the file system is read-only")
    try:  # raised from a full disk
        try:
            raise full
        except OSError as e:
            raise RuntimeError("saving failed") from e
    except RuntimeError as e:
        assert storage_problem(e).startswith("the disk is full")
    # a writer outside Python (safetensors) words it in its message only
    rust = Exception('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')
    assert storage_problem(rust) == "the disk is full (No space left on device)"
    assert storage_problem(FileNotFoundError(errno.ENOENT, "No such file or directory")) is None
    assert storage_problem(ValueError("bad value")) is None
    try:  # an error raised "from None" while a full disk was being handled is not about the disk
        try:
            raise full
        except OSError:
            raise ValueError("unrelated") from None
    except ValueError as e:
        assert storage_problem(e) is None
