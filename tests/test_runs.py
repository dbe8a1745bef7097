"""Files of resumable runs: atomic writes survive failures, ledgers survive crashes, fingerprints
name what changed."""
import errno
import json
import logging
import os
import stat
import threading

import pytest

from sdjax import runs


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- atomic writes ---------------------------------------------------------------------------------

def test_write_atomically_writes_bytes_and_text_readable_by_others(tmp_path):
    path = tmp_path / "out.bin"
    runs.write_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    runs.write_atomically(str(path), "é\n")
    assert path.read_bytes() == "é\n".encode("utf-8")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert _leftovers(tmp_path) == []


def test_json_that_cannot_be_serialized_leaves_the_old_file(tmp_path):
    path = tmp_path / "config.json"
    runs.write_json_atomically(path, {"steps": 20})
    with pytest.raises(TypeError):
        runs.write_json_atomically(path, {"steps": object()})
    assert json.loads(path.read_text()) == {"steps": 20}
    assert _leftovers(tmp_path) == []


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    runs.write_atomically(path, b"old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runs.write_atomically(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_removes_the_temporary(tmp_path):
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        runs.write_atomically(target, b"data")
    assert target.is_dir()
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_an_unwritable_folder_leaves_the_old_file(tmp_path):
    path = tmp_path / "sweep.json"
    runs.write_json_atomically(path, {"height": 32})
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            runs.write_json_atomically(path, {"height": 48})
    finally:
        tmp_path.chmod(0o755)
    assert json.loads(path.read_text()) == {"height": 32}
    assert _leftovers(tmp_path) == []


def test_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    # Hosts of a multi-host run write the same config at once: each must rename its own file.
    path = tmp_path / "config.json"
    contents = [json.dumps({"writer": w, "pad": "x" * 10000}) for w in range(6)]
    errors = []

    def write(text):
        try:
            for _ in range(30):
                runs.write_atomically(path, text)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(text,)) for text in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert path.read_text() in contents
    assert _leftovers(tmp_path) == []


# --- ledgers ---------------------------------------------------------------------------------------

def test_appended_records_read_back_in_order_and_are_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    runs.append_jsonl(path, {"a": 1})
    runs.append_jsonl(path, {"b": 2}, {"c": [3]})
    assert len(synced) == 2
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n{"c": [3]}\n'
    assert runs.read_jsonl(path) == [{"a": 1}, {"b": 2}, {"c": [3]}]


def test_appending_nothing_creates_no_file_and_a_missing_ledger_is_empty(tmp_path):
    path = tmp_path / "manifest.jsonl"
    runs.append_jsonl(path)
    assert not path.exists()
    assert runs.read_jsonl(path) == []


@pytest.mark.parametrize("tail", ['{"b": 2, "c', "\x00\x00\x00\x00", '{"b": 2, "c\n'])
def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog, tail):
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n' + tail)
    with caplog.at_level(logging.WARNING):
        assert runs.read_jsonl(path) == [{"a": 1}]
    assert "records.jsonl:2: torn last line skipped" in caplog.text


def test_a_corrupt_middle_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2, \n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"records\.jsonl:3: not a JSON record"):
        runs.read_jsonl(path)
    with pytest.raises(ValueError, match=r"records\.jsonl:3:"):
        runs.repair_jsonl(path)


def test_after_repair_an_append_starts_its_own_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b')
    runs.repair_jsonl(path)
    assert path.read_text() == '{"a": 1}\n'
    runs.append_jsonl(path, {"a": 3})
    assert runs.read_jsonl(path) == [{"a": 1}, {"a": 3}]


def test_a_whole_last_record_missing_its_newline_is_kept(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    assert runs.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    runs.repair_jsonl(path)
    runs.append_jsonl(path, {"a": 3})
    assert runs.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_repair_leaves_a_sound_ledger_alone(tmp_path):
    path = tmp_path / "records.jsonl"
    runs.repair_jsonl(path)
    assert not path.exists()
    path.write_text('{"a": 1}\n{"a": 2}\n')
    runs.repair_jsonl(path)
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_a_ledger_rewritten_as_a_whole_reads_back(tmp_path):
    path = tmp_path / "records.jsonl"
    runs.append_jsonl(path, {"a": 1}, {"a": 2})
    runs.write_jsonl_atomically(path, [{"a": 2, "score": 0.5}])
    assert runs.read_jsonl(path) == [{"a": 2, "score": 0.5}]
    assert _leftovers(tmp_path) == []


# --- fingerprints ----------------------------------------------------------------------------------

def test_the_first_run_writes_its_fingerprint_and_the_same_settings_resume(tmp_path):
    path = tmp_path / "sweep.json"
    runs.check_fingerprint(path, {"height": 32, "size": (2, 3)}, "x", remedy="y")
    assert json.loads(path.read_text()) == {"height": 32, "size": [2, 3]}
    runs.check_fingerprint(path, {"height": 32, "size": (2, 3)}, "x", remedy="y")


def test_a_mismatch_names_every_changed_field_with_before_and_after(tmp_path):
    path = tmp_path / "sweep.json"
    runs.check_fingerprint(path, {"height": 32, "width": 32, "model": "a"}, "x", remedy="y")
    with pytest.raises(ValueError) as error:
        runs.check_fingerprint(path, {"height": 48, "width": 32, "model": "b"},
                               "this out dir holds a sweep", remedy="use another out_dir")
    assert str(error.value) == (f"{path}: this out dir holds a sweep made with other settings "
                                f"(height: 32 -> 48, model: 'a' -> 'b'); use another out_dir")
    assert json.loads(path.read_text())["height"] == 32  # a refused run leaves it as it was


def test_fields_the_stored_fingerprint_lacks_are_not_compared(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"steps": 20}))
    runs.check_fingerprint(path, {"steps": 20, "clip_skip": 2}, "x", remedy="y")
    assert json.loads(path.read_text()) == {"steps": 20, "clip_skip": 2}


def test_the_stored_record_may_hold_more_than_the_fingerprint(tmp_path):
    path = tmp_path / "config.json"
    runs.check_fingerprint(path, {"seed": 1}, "x", remedy="y", record={"seed": 1, "batch": 8})
    runs.check_fingerprint(path, {"seed": 1}, "x", remedy="y", record={"seed": 1, "batch": 4})
    assert json.loads(path.read_text()) == {"seed": 1, "batch": 4}
    with pytest.raises(ValueError, match=r"seed: 1 -> 2"):
        runs.check_fingerprint(path, {"seed": 2}, "x", remedy="y", record={"seed": 2})
