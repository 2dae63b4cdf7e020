"""A run directory that cannot be written (a full disk): one message, nothing durable lost.

The disk fills up in a fake way: writes to the journal get a budget of bytes (the last write
goes through in part, as ``write`` does when space runs out), or an image's data sync fails.
The run must stop with one message and the run-directory exit code, leave the journal's lines
whole and no temporary image behind, and a resume, with space again, must judge what is
missing and nothing twice.
"""

from __future__ import annotations

import errno
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_prompts
from tests.test_reliability_inputs import CONFIG as RUN_CONFIG
from trig_stream import files, store
from trig_stream.cli import main
from trig_stream.errors import RunDirError
from trig_stream.exit_codes import EXIT_OK, EXIT_RUN_DIR
from trig_stream.journal import JOURNAL, Journal, torn_tail_kept
from trig_stream.locks import LOCK
from trig_stream.manifest import IMAGES, MANIFEST, Manifest
from trig_stream.new_runs import next_free_run_dir
from trig_stream.quarantine_text import QUARANTINE, QUARANTINE_PARTIAL
from trig_stream.records import Judgement, QuarantinedRecord
from trig_stream.run_dir_paths import PARTIAL

PROMPTS = 12

CONFIG = RUN_CONFIG.replace('name = "broken"', 'name = "full"')
"""The reliability tests' run: synthetic images, the fake judge."""


class FullDisk:
    """``os.write`` that lets ``budget`` bytes into files named ``name``, then refuses with
    ``error`` (ENOSPC; EFBIG for the file-size limit, ``ulimit -f``)."""

    def __init__(self, name: str, budget: int, error: int = errno.ENOSPC) -> None:
        self.name = name
        self.budget = budget
        self.error = error
        self.refused = 0
        self._write = os.write

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(self.name):
            return self._write(fd, data)
        if self.budget <= 0:
            self.refused += 1
            raise OSError(self.error, os.strerror(self.error))
        written = self._write(fd, bytes(data[: self.budget]))
        self.budget -= written
        return written


def no_space_for_images(fd: int) -> None:
    """``files._sync_data`` for a disk that has no room left for images (their temporary
    files live in the images' ``.partial`` folder); other files sync as usual."""
    if f"/{IMAGES}/{PARTIAL}/" in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    SYNC_DATA(fd)


SYNC_DATA = files._sync_data


def journal_keys(run_dir: Path) -> Counter[tuple[str, str, str]]:
    keys: Counter[tuple[str, str, str]] = Counter()
    for line in (run_dir / JOURNAL).read_text().splitlines():
        judgement = json.loads(line)  # every line whole
        keys[judgement["model"], judgement["data_id"], judgement["dimension"]] += 1
    return keys


@pytest.fixture
def run_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_prompts(tmp_path / "prompts.json", PROMPTS)
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    return path


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
@pytest.mark.parametrize(
    ("full", "error"),
    [("journal", errno.ENOSPC), ("images", errno.ENOSPC), ("journal", errno.EFBIG)],
    ids=["journal", "images", "journal-size-limit"],
)
def test_a_full_disk_stops_the_run_with_one_message_and_a_resume_loses_nothing(
    run_config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    full: str,
    error: int,
) -> None:
    # A journal past `ulimit -f` (EFBIG: CPython ignores SIGXFSZ) said "File too large" and
    # nothing of what to do, nor that the run resumes.
    disk = FullDisk(JOURNAL, budget=3_000, error=error)  # a few lines, the last one cut short
    if full == "journal":
        monkeypatch.setattr(os, "write", disk)
    else:
        monkeypatch.setattr(files, "_sync_data", no_space_for_images)
    assert main(["run", str(run_config), "--headless", "--no-report"]) == EXIT_RUN_DIR
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    advice = {
        errno.ENOSPC: "No space left on device; free some space, then run the same command",
        errno.EFBIG: "File too large; the file-size limit was reached: raise it (ulimit -f), "
        "then run the same command",
    }
    assert advice[error] in err, err
    assert "the run resumes where it stopped" in err, err
    assert f"cannot {'write to the journal' if full == 'journal' else 'write images'}" in err

    run_dir = run_config.parent / "runs" / "full"
    before = journal_keys(run_dir)  # parses: the cut line was taken back
    assert not list((run_dir / IMAGES / PARTIAL).iterdir())
    if full == "journal":
        assert disk.refused == 1 and 0 < len(before) < 2 * PROMPTS

    monkeypatch.undo()  # space again
    monkeypatch.chdir(run_config.parent)
    assert main(["run", str(run_config), "--headless", "--no-report"]) == EXIT_OK
    after = journal_keys(run_dir)
    assert len(after) == 2 * PROMPTS and set(after.values()) == {1}
    assert all(after[key] == 1 for key in before)


def judgement(n: int) -> Judgement:
    """An ``ok`` judgement of sample ``IQ-R_TA-C_<n>``."""
    line = {"model": "m", "task": "t2i", "pair": "IQ-R_TA-C", "dimension": "IQ-R"}
    judge = {"backend": "fake", "model": "fake"}
    return Judgement.model_validate(
        {**line, "data_id": f"IQ-R_TA-C_{n}", "metric": "s", "status": "ok", "score": 0.5}
        | {"judge": judge}
    )


def append_only(fd: int, length: int) -> None:
    """``os.ftruncate`` of an append-only file (``chattr +a``): lines go in, none comes out."""
    raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
def test_a_journal_write_cut_short_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / JOURNAL)
    journal.open()
    first, second = judgement(1), judgement(2)
    journal.append([first])
    size = (tmp_path / JOURNAL).stat().st_size
    monkeypatch.setattr(os, "write", FullDisk(JOURNAL, budget=size // 2))
    with pytest.raises(RunDirError, match=r"cannot write to the journal .*No space left"):
        journal.append([second])
    assert (tmp_path / JOURNAL).stat().st_size == size
    monkeypatch.undo()
    journal.append([second])
    journal.close()
    lines = (tmp_path / JOURNAL).read_text().splitlines()
    assert [json.loads(raw)["data_id"] for raw in lines] == ["IQ-R_TA-C_1", "IQ-R_TA-C_2"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
@pytest.mark.parametrize("budget", [10, 0])
def test_a_journal_write_an_append_only_journal_cannot_take_back_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    # Taking back the part line a full disk let in failed silently on an append-only journal:
    # the run said to free some space and run again, and every run then failed with a bare
    # "journal.jsonl: Operation not permitted".
    journal = Journal(tmp_path / JOURNAL)
    journal.open()
    monkeypatch.setattr(os, "write", FullDisk(JOURNAL, budget=budget))
    monkeypatch.setattr(os, "ftruncate", append_only)
    with pytest.raises(RunDirError) as raised:
        journal.append([judgement(1)])
    journal.close()
    message = str(raised.value)
    assert message.startswith(f"cannot write to the journal {tmp_path / JOURNAL}: No space left")
    if budget:
        assert message.endswith(f"; but first: {torn_tail_kept(tmp_path / JOURNAL, budget)}")
    else:  # nothing reached the file: nothing to cut
        assert "chattr" not in message and message.endswith("already written is kept")


def test_a_torn_tail_an_append_only_journal_keeps_is_named_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its cut failed with a bare "journal.jsonl: Operation not permitted".
    path = tmp_path / JOURNAL
    path.write_bytes(judgement(1).model_dump_json().encode() + b'\n{"schema_ver')
    kept = path.read_bytes()
    monkeypatch.setattr(os, "ftruncate", append_only)
    journal = Journal(path)
    with pytest.raises(RunDirError) as raised:
        journal.open()
    assert str(raised.value) == torn_tail_kept(path, 12)
    assert path.read_bytes() == kept
    journal.open(cut=False)  # a run checks the directory first, then cuts
    with pytest.raises(RunDirError) as raised:
        journal.cut_torn_tail()
    journal.close()
    assert str(raised.value) == torn_tail_kept(path, 12) and path.read_bytes() == kept


def test_a_run_directory_it_cannot_write_in_is_not_said_uncreated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under umask 777 the folder is made but nothing can be written in it: the message said
    # "cannot create the run directory", which was there to see.
    def refused(self: store.RunDir) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path / LOCK))

    monkeypatch.setattr(store.RunDir, "_acquire_lock", refused)
    run_dir = tmp_path / "run"
    with pytest.raises(RunDirError) as refused_dir:
        store.RunDir.open(run_dir, Manifest(run_name="r", task="t2i"))
    assert str(refused_dir.value) == (
        f"cannot write in the run directory {run_dir} ({LOCK}): Permission denied"
    )


class DiskFullUnder:
    """A disk that has no room left under ``folder``: every write of a file there fails
    (ENOSPC), through ``os.write`` (:meth:`write`) or a file ``io.open`` opened (:meth:`open`,
    buffered or not); other files are written as usual."""

    def __init__(self, folder: Path) -> None:
        self.prefix = f"{folder}{os.sep}"
        self.refused = 0
        self._write = os.write
        self._open = io.open
        disk = self

        class FullFile(io.FileIO):
            def write(self, data: Any) -> int:
                disk.refused += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self._full_file = FullFile

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(self.prefix):
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._write(fd, data)

    def open(self, file: Any, mode: str = "r", buffering: int = -1, *args: Any) -> Any:
        writes = any(letter in mode for letter in "wax+")
        # A file descriptor (os.fdopen's, of a file opened refusing links) by its path.
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        if not writes or not path.startswith(self.prefix) or "b" not in mode:
            return self._open(file, mode, buffering, *args)
        raw = self._full_file(file, mode)
        if buffering == 0:
            return raw
        return io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
@pytest.mark.parametrize("new_run", [False, True], ids=["first-run", "new-run"])
def test_a_full_disk_leaves_no_run_directory_it_made_behind(
    run_config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    new_run: bool,
) -> None:
    # The pid the lock file refused stayed in its buffer, and close() wrote it again inside
    # the error's handler: a traceback (exit 1), runs/full/{journal.jsonl,run.lock} left
    # behind, and each --new-run another empty full-N.
    output = run_config.parent / "runs"
    earlier = output / "full"
    if new_run:  # an earlier run's directory, which --new-run goes beside
        earlier.mkdir(parents=True)
        (earlier / JOURNAL).write_text("")
    disk = DiskFullUnder(output)
    monkeypatch.setattr(os, "write", disk.write)
    monkeypatch.setattr(io, "open", disk.open)
    argv = ["run", str(run_config), "--headless", "--no-report"]
    assert main([*argv, "--new-run"] if new_run else argv) == EXIT_RUN_DIR
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert "No space left on device; free some space" in err, err
    assert "nothing was written" in err and "already written is kept" not in err, err
    assert disk.refused
    if new_run:
        assert [p.name for p in output.iterdir()] == ["full"]
        assert [p.name for p in earlier.iterdir()] == [JOURNAL]
    else:
        assert not output.exists()  # the output folder too: this run made it


def test_a_run_directory_that_fails_to_open_keeps_what_an_earlier_run_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a directory the failing run made is removed: a resume keeps the results it found.
    run_dir = tmp_path / "run"
    manifest = Manifest(run_name="r", task="t2i")
    store.RunDir.open(run_dir, manifest)[0].close()
    before = sorted(p.name for p in run_dir.iterdir())

    def full(path: Path, data: bytes, *, temp_dir: Path | None = None) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "write_atomic", full)
    with pytest.raises(RunDirError, match="every judgement already written is kept"):
        store.RunDir.open(run_dir, manifest)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (run_dir / MANIFEST).exists()


@pytest.mark.parametrize("new_run", [False, True], ids=["open", "next_free_run_dir"])
def test_a_run_directory_the_disk_refuses_leaves_no_folder_above_it_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_run: bool
) -> None:
    # The disk had room for out/ and out/runs/, not for the run directory: both stayed, and
    # the message promised a resume keeping judgements of a run that never began.
    run_dir = tmp_path / "out" / "runs" / "myrun"
    mkdir = os.mkdir

    def full_for_runs(path: Any, *args: Any, **kwargs: Any) -> None:
        # Once its parents are made: mkdir(parents=True) tries the folder itself first.
        if Path(path).name.startswith("myrun") and Path(path).parent.is_dir():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", full_for_runs)
    with pytest.raises(RunDirError) as refused:
        if new_run:
            next_free_run_dir(run_dir)
        else:
            store.RunDir.open(run_dir, Manifest(run_name="myrun", task="t2i"))
    assert str(refused.value) == (
        f"cannot create the run directory {run_dir}: No space left on device; free some "
        "space, then run the same command again: nothing was written, and the run starts "
        "from the beginning"
    )
    assert list(tmp_path.iterdir()) == []


def test_folders_made_for_a_refused_run_directory_keep_what_was_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the folders make_dirs made go: the output folder found there stays, with its files.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    mkdir = os.mkdir

    def full_for_runs(path: Any, *args: Any, **kwargs: Any) -> None:
        # Once its parents are made: mkdir(parents=True) tries the folder itself first.
        if Path(path).name == "myrun" and Path(path).parent.is_dir():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", full_for_runs)
    with pytest.raises(OSError, match="No space left on device"):
        files.make_dirs(tmp_path / "out" / "runs" / "myrun")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


class TornSecondWrite:
    """``os.write`` to files named ``name`` on a disk that fills up at the second write: the
    first is written whole, the second half-way (as a full disk does), the next refused."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self._write = os.write

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(self.name):
            return self._write(fd, data)
        self.calls += 1
        if self.calls == 1:
            return self._write(fd, data)
        if self.calls == 2:
            return self._write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
def test_a_quarantine_list_a_full_disk_cut_short_is_never_shown_as_whole(
    run_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The half line stayed, and the list took the name of one read through:
    # quarantine.jsonl of 1.5 records, which `status` counted as 2, quarantined by a run
    # that read the dataset through.
    prompts = run_config.parent / "prompts.json"
    records = json.loads(prompts.read_text())
    for index in (1, 3, 5):
        records[index]["prompt"] = ""
    prompts.write_text(json.dumps(records))
    disk = TornSecondWrite(QUARANTINE_PARTIAL)
    monkeypatch.setattr(os, "write", disk)
    assert main(["run", str(run_config), "--headless", "--no-report"]) == EXIT_RUN_DIR
    run_dir = run_config.parent / "runs" / "full"
    partial = run_dir / QUARANTINE_PARTIAL
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: cannot write to {partial}: No space left on device; free some space" in err
    assert err.count("error:") == 1
    assert not (run_dir / QUARANTINE).exists()
    [line] = partial.read_text().splitlines(keepends=True)  # the torn line taken back
    assert line.endswith("\n") and json.loads(line)["index"] == 1

    monkeypatch.setattr(os, "write", disk._write)
    assert main(["status", str(run_dir)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "1 dataset records quarantined by a run stopped before it read the dataset through "
        f"(see {partial})"
    ) in out

    monkeypatch.undo()  # space again: the resume reads the dataset through
    monkeypatch.chdir(run_config.parent)
    assert main(["run", str(run_config), "--headless", "--no-report"]) == EXIT_OK
    lines = (run_dir / QUARANTINE).read_text().splitlines()
    assert [json.loads(raw)["index"] for raw in lines] == [1, 3, 5] and not partial.exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd")
def test_a_quarantine_write_cut_short_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = store.RunDir.open(tmp_path, Manifest(run_name="r", task="t2i"))
    records = [
        QuarantinedRecord(index=n, data_id=f"IQ-R_TA-C_{n}", reason="missing prompt", record={})
        for n in (1, 2)
    ]
    run.quarantine(records[0])
    partial = tmp_path / QUARANTINE_PARTIAL
    size = partial.stat().st_size
    monkeypatch.setattr(os, "write", FullDisk(QUARANTINE_PARTIAL, budget=size // 2))
    with pytest.raises(RunDirError, match=rf"cannot write to {partial}: No space left"):
        run.quarantine(records[1])
    assert partial.stat().st_size == size
    monkeypatch.undo()
    run.finish_quarantine()  # a list missing a record is not put in place as whole
    run.close()
    assert not (tmp_path / QUARANTINE).exists()
    assert [json.loads(raw)["index"] for raw in partial.read_text().splitlines()] == [1]


def test_a_folder_that_appears_in_place_of_the_quarantine_list_is_named(tmp_path: Path) -> None:
    # The rename names the list it moves: "cannot replace .../quarantine.jsonl:
    # .../quarantine.jsonl.partial: Is a directory" blamed the file that was fine.
    run, _ = store.RunDir.open(tmp_path, Manifest(run_name="r", task="t2i"))
    final = tmp_path / QUARANTINE
    final.mkdir()
    with run, pytest.raises(RunDirError) as refused:
        run.finish_quarantine()
    assert str(refused.value) == (
        f"cannot replace {final} with this run's quarantine list: {final} is a folder; move or "
        "remove it, then run the same command again (the run resumes where it stopped)"
    )
