"""Atomic writes: the whole file or none, with the permissions any other write would give it."""
import os
import stat

from ctclab import storage


def test_an_atomic_write_leaves_the_file_as_open_would_and_no_temp_file(tmp_path):
    target = tmp_path / "reports" / "s.md"
    storage.write_text(target, "one\n")
    storage.write_text(target, "two\n")  # replaced whole
    (tmp_path / "plain").write_text("x")  # what open() gives under this umask
    assert target.read_text() == "two\n" and os.listdir(target.parent) == ["s.md"]
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~storage.UMASK
