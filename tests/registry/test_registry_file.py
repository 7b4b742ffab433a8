"""A registry file that is not forge's, or is damaged, is refused at open with one clear error naming the file,
in the library and through every CLI command that opens it (no traceback)."""
import sqlite3
import subprocess
import sys

import pytest

from forge.registry import ModelRegistry, RegistryFileError, new_session_id


def _valid(path):
    with ModelRegistry(path) as registry:
        for _ in range(30):
            registry.create_session(new_session_id("s"), {"pad": "x" * 2000})
    return path.read_bytes()


def test_garbage_truncated_and_foreign_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 50)
    with pytest.raises(RegistryFileError, match=r"garbage.db is not a forge registry \(not an SQLite database\)"):
        ModelRegistry(garbage)
    good = _valid(tmp_path / "good.db")
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(good[: len(good) // 2] + bytes(range(256)) * (len(good) // 512))
    with pytest.raises(RegistryFileError, match="damaged.db: the registry database (is corrupted|cannot be read)"):
        ModelRegistry(damaged)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (text)")
    with pytest.raises(RegistryFileError, match="an SQLite database but not a forge registry"):
        ModelRegistry(foreign)
    assert garbage.read_bytes() == b"not a database at all" * 50          # refused files are left as they were
    with ModelRegistry(tmp_path / "empty.db") as registry:                 # a new, empty file still works
        assert registry.list_sessions() == []


@pytest.mark.parametrize("command", [("status",), ("models",), ("resume", "some-session"), ("clean",)])
def test_the_cli_says_so_in_one_line(tmp_path, command):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "registry.db").write_bytes(b"\x00garbage" * 100)
    result = subprocess.run([sys.executable, "-P", "-m", "forge.cli", *command], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "registry.db is not a forge registry" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_registry_deleted_or_replaced_while_open_refuses_every_later_write(tmp_path):
    from forge.registry import RegistryIOError

    for how in ("deleted", "replaced"):
        path = tmp_path / f"{how}.db"
        with ModelRegistry(path) as registry:
            registry.create_session("before", {})
            path.unlink()
            if how == "replaced":
                with ModelRegistry(path) as other:           # a new database now sits at the same path
                    other.create_session("other", {})
            with pytest.raises(RegistryIOError, match=f"{how}.db: create_session refused: the database file was "
                                                      "deleted or replaced"):
                registry.create_session("after", {})


def test_paths_that_cannot_hold_a_registry_get_one_clear_error(tmp_path):
    from forge.registry import RegistryIOError

    with pytest.raises(RegistryFileError, match="is a folder; point registry.path at a file"):
        ModelRegistry(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryIOError, match="cannot create its folder"):
        ModelRegistry(tmp_path / "file" / "registry.db")
