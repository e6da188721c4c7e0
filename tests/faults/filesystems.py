"""Small real file systems for SQLite faults. They need root (CAP_SYS_ADMIN) to mount.

- `small_tmpfs`: a tmpfs of a fixed size. `fill()` writes a filler file until the kernel
  says ENOSPC, so the next write SQLite makes that needs a new page fails and SQLite
  reports SQLITE_FULL; `free()` deletes the filler (the operator frees space).
  `remount(read_only=...)` turns it read-only while nothing on it is open.
- `ext4_image`: an ext4 file system in an image file, loop-mounted with
  `errors=remount-ro`. `fail()` makes the kernel record a file-system error
  (/sys/fs/ext4/<dev>/trigger_fs_error, the ext4 test hook) and, as on a real error,
  remount it read-only at once, with SQLite's files open: every write then fails
  (EROFS; SQLite reports SQLITE_IOERR_WRITE). `repair()` is the operator's fix:
  unmount, `e2fsck -fy`, mount again.

Why not `mount -o remount,ro` (or a read-only bind remount)? Linux refuses it with EBUSY
while any file on the mount is open for writing, which a running server's journal always
is; an ext4 error is how a file system really turns read-only under a running process.
A test that cannot mount here is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILL_CHUNK = 65_536


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def _require(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root: file-system fault tests skipped")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: file-system fault tests skipped")


def _mount_or_skip(*argv: str) -> None:
    mounted = _run("mount", *argv)
    if mounted.returncode != 0:
        pytest.skip(
            f"`mount {' '.join(argv)}` is not permitted here ({mounted.stderr.strip()}): "
            "file-system fault test skipped"
        )


def _unmount(path: Path) -> None:
    """Unmount, lazily if something still holds it (teardown must not fail the run)."""
    if _run("umount", str(path)).returncode != 0:
        _run("umount", "-l", str(path))


class Tmpfs:
    """A mounted tmpfs at `path`, with a filler file to make it full."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> int:
        """Write until the file system is full (ENOSPC); the bytes written."""
        written = 0
        descriptor = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (b"\0" * FILL_CHUNK, b"\0"):  # then the last partial page
                while True:
                    try:
                        written += os.write(descriptor, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(descriptor)
        assert os.statvfs(self.path).f_bavail == 0, "the file system is not full"
        return written

    def free(self) -> None:
        self._filler.unlink()

    def remount(self, *, read_only: bool) -> None:
        """Remount read-only or read-write (read-only works only while no file is open)."""
        done = _run("mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(self.path))
        assert done.returncode == 0, f"remount failed: {done.stderr}"


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Tmpfs]:
    _require("mount", "umount")
    path.mkdir(parents=True, exist_ok=True)
    _mount_or_skip("-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path))
    try:
        yield Tmpfs(path)
    finally:
        _unmount(path)


class Ext4Image:
    """An ext4 image loop-mounted at `path` with errors=remount-ro."""

    def __init__(self, image: Path, path: Path) -> None:
        self.image = image
        self.path = path

    def mount(self) -> None:
        _mount_or_skip("-o", "loop,errors=remount-ro", str(self.image), str(self.path))

    def _error_hook(self) -> Path:
        source = _run("findmnt", "-n", "-o", "SOURCE", str(self.path)).stdout.strip()
        return Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error"

    def fail(self) -> None:
        """A file-system error: the kernel remounts it read-only, files open or not."""
        hook = self._error_hook()
        if not hook.exists():
            pytest.skip(f"{hook} does not exist (kernel without the ext4 error hook)")
        hook.write_text("callcredit fault test: file system error\n")
        with pytest.raises(OSError) as refused:
            (self.path / "probe").write_bytes(b"x")
        assert refused.value.errno == errno.EROFS, refused.value

    def repair(self) -> None:
        """What an operator does: unmount, check and fix, mount read-write again."""
        unmounted = _run("umount", str(self.path))
        assert unmounted.returncode == 0, f"umount failed: {unmounted.stderr}"
        checked = _run("e2fsck", "-f", "-y", str(self.image))
        # 0: clean, 1: errors corrected (the error the test recorded, at least).
        assert checked.returncode in (0, 1), f"e2fsck: {checked.returncode}\n{checked.stdout}"
        self.mount()


@contextlib.contextmanager
def ext4_image(image: Path, path: Path, size_bytes: int) -> Iterator[Ext4Image]:
    _require("mount", "umount", "mkfs.ext4", "e2fsck", "findmnt")
    path.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as file:
        file.truncate(size_bytes)
    made = _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
    assert made.returncode == 0, f"mkfs.ext4 failed: {made.stderr}"
    fs = Ext4Image(image, path)
    fs.mount()
    try:
        yield fs
    finally:
        _unmount(path)
