"""Outputs appear whole or not at all, with the usual file mode."""

import os

import pytest

from ompq_plugin.errors import OmpqError
from ompq_plugin.fileio import atomic_path, write_text_atomic


def test_written_file_is_complete_and_has_umask_mode(tmp_path):
    path = tmp_path / "out.json"
    write_text_atomic(path, "{}\n")
    assert path.read_text() == "{}\n"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failure_leaves_neither_output_nor_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("export failed")
    assert path.read_text() == "old"  # the previous file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(OmpqError, match="does not exist"):
        write_text_atomic(tmp_path / "nope" / "x.json", "")
