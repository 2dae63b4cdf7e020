"""``validate`` and ``run`` agree on a run directory that cannot be looked up or written, and
``validate`` takes ``run``'s ``--new-run`` and ``--retry-errors``."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.conftest import write_prompts
from tests.test_cli import write_config
from trig_stream.backends.registry import build_generator
from trig_stream.cli import main
from trig_stream.config import load_config
from trig_stream.errors import FatalBackendError, RunDirError
from trig_stream.exit_codes import EXIT_FATAL, EXIT_OK, EXIT_RUN_DIR
from trig_stream.files import storage_error, unchangeable, write_atomic
from trig_stream.journal import torn_tail_kept
from trig_stream.records import MAX_NAME_CHARS
from trig_stream.store import RunDir
from trig_stream.testing.synthetic import SyntheticGenerator

RUN = ["run", "--headless", "--no-report"]


def both_refuse(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line validate and run both end with (exit 3), the same from each."""
    errors = []
    for command in (["validate"], RUN):
        assert main([*command, str(path)]) == EXIT_RUN_DIR
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and errors[0].count("\n") == 1
    return errors[0]


def test_an_output_dir_that_cannot_be_looked_up_is_refused_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A name longer than the file system allows: both commands ended in a traceback (exit 1).
    path = write_config(tmp_path, samples=2)
    long = "x" * 300
    path.write_text(path.read_text().replace('output_dir = "runs"', f'output_dir = "{long}"'))
    err = both_refuse(path, capsys)
    where = tmp_path / long / "cli"
    assert err == f"error: cannot create the run directory {where}: File name too long\n"


def output_dir_for(tmp_path: Path, length: int) -> Path:
    """An ``output_dir`` under ``tmp_path`` whose run directory (``cli`` in it) is ``length``
    bytes long, in folders of 200 bytes at most."""
    left = length - len(os.fsencode(tmp_path / "cli")) - 1
    parts = []
    while left > 0:
        parts.append("d" * min(200, left - 1 if left > 200 else left))
        left -= len(parts[-1]) + 1
    return tmp_path.joinpath(*parts)


@pytest.mark.parametrize("new_run", [False, True])
def test_a_run_directory_too_long_for_the_files_of_a_run_is_refused_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], new_run: bool
) -> None:
    # 4,060 bytes, under the system's limit (4,096): validate said ok, and run failed on its
    # manifest's temporary file ("cannot open the run directory ...: .../.manifest.json.
    # <pid>.<thread>.tmp: File name too long").
    path = write_config(tmp_path, samples=2)
    output_dir = output_dir_for(tmp_path, 4060)
    path.write_text(path.read_text().replace('output_dir = "runs"', f'output_dir = "{output_dir}"'))
    flag = ["--new-run"] * new_run
    errors = []
    for command in (["validate"], RUN):
        assert main([*command, *flag, str(path)]) == EXIT_RUN_DIR
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1]
    assert errors[0] == (
        f"error: cannot create the run directory {output_dir / 'cli'}: File name too long: "
        "its path is 4060 bytes, and the files a run writes in it would be longer than this "
        "system allows (4096 bytes): an image adds up to 150 bytes to it (images/t2i/<model>/"
        "<data_id>.png, a data_id of up to 128 characters); shorten output_dir, [run] name or "
        "the model's name\n"
    )
    assert not (output_dir / "cli").exists()


@pytest.mark.parametrize("existing", [False, True], ids=["new", "resumed"])
def test_a_run_directory_too_long_for_a_models_images_is_refused_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: bool
) -> None:
    # 3,960 bytes left room for an image's temporary file, not for its path under a model of
    # 128 characters (images/t2i/<model>/<data_id>.png): validate ended in an OSError
    # traceback (exit 1) looking for the images, and so did run.
    path = write_config(tmp_path, samples=2)
    output_dir = output_dir_for(tmp_path, 3960)
    model = "m" * MAX_NAME_CHARS
    text = path.read_text().replace('output_dir = "runs"', f'output_dir = "{output_dir}"')
    path.write_text(text.replace('name = "synth"', f'name = "{model}"'))
    if existing:
        (output_dir / "cli").mkdir(parents=True)
    err = both_refuse(path, capsys)
    what, adds = ("write in", "at least 146") if existing else ("create", "up to 273")
    data_ids = "one character" if existing else "up to 128 characters"
    assert err == (
        f"error: cannot {what} the run directory {output_dir / 'cli'}: File name too long: its "
        "path is 3960 bytes, and the files a run writes in it would be longer than this system "
        f"allows (4096 bytes): an image adds {adds} bytes to it (images/t2i/<model>/<data_id>"
        f".png, a data_id of {data_ids}); shorten output_dir, [run] name or the model's name\n"
    )
    assert (output_dir / "cli").exists() == existing


def test_a_run_directory_there_is_taken_where_its_images_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 3,960 bytes leave room for images/t2i/synth/<data_id>.png with this dataset's data_ids,
    # not with one of 128 characters: a directory a run had begun in at that depth was
    # refused on resume, for data_ids its dataset does not have.
    path = write_config(tmp_path, samples=2)
    output_dir = output_dir_for(tmp_path, 3960)
    path.write_text(path.read_text().replace('output_dir = "runs"', f'output_dir = "{output_dir}"'))
    (output_dir / "cli").mkdir(parents=True)
    for command in (["validate"], RUN):
        assert main([*command, str(path)]) == EXIT_OK, capsys.readouterr().err
    assert len(list((output_dir / "cli" / "images" / "t2i" / "synth").glob("*.png"))) == 2


def test_a_data_id_too_long_for_a_run_directory_there_is_refused_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The directory there is checked for a data_id of one character: one of 120 ended
    # validate and run in an OSError traceback (exit 1), looking for its image.
    path = write_config(tmp_path, samples=2)
    prompts = tmp_path / "prompts.json"
    data_id = "IQ-R_TA-C_" + "z" * 110
    prompts.write_text(prompts.read_text().replace('"IQ-R_TA-C_1"', f'"{data_id}"'))
    output_dir = output_dir_for(tmp_path, 3960)
    path.write_text(path.read_text().replace('output_dir = "runs"', f'output_dir = "{output_dir}"'))
    (output_dir / "cli").mkdir(parents=True)
    errors = []
    for command in (["validate"], RUN):
        assert main([*command, str(path)]) == EXIT_RUN_DIR
        errors.append(capsys.readouterr().err.splitlines()[-1])  # run's, once it has begun
    assert (
        errors[0]
        == errors[1]
        == (
            f"error: cannot write in the run directory {output_dir / 'cli'}: File name too long: "
            "its path is 3960 bytes, and the files a run writes in it would be longer than this "
            f"system allows (4096 bytes): the image of {data_id} adds 142 bytes to it "
            "(images/t2i/synth/<data_id>.png); shorten output_dir, [run] name, the model's name or "
            "the data_id"
        )
    )


def test_a_folder_on_the_way_without_search_permission_is_refused_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root searches any folder: the refusal is faked where the path is looked up.
    path = write_config(tmp_path, samples=2)
    run_dir = tmp_path / "runs" / "cli"
    looked_up = os.stat

    def stat(where: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(where).startswith(str(run_dir)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(where))
        return looked_up(where, *args, **kwargs)  # type: ignore[arg-type]

    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", stat)
    err = both_refuse(path, capsys)
    assert err == f"error: cannot create the run directory {run_dir}: Permission denied\n"


@pytest.mark.timeout(60)  # a pipe as the quarantine list was waited on for ever
@pytest.mark.parametrize(
    ("name", "kind", "error"),
    [
        ("manifest.json", "folder", "cannot open the run directory {d}: {f}: Is a directory"),
        ("run.lock", "folder", "cannot write in the run directory {d} (run.lock): Is a directory"),
        (
            "run.lock",
            "pipe",
            "cannot write in the run directory {d} (run.lock): it is a named pipe (FIFO), "
            "not a file",
        ),
        # Refused only once the dataset was read through, every run stopping there, blaming
        # the .partial list it would put in place; a pipe there was replaced unasked.
        ("quarantine.jsonl", "folder", "cannot open the run directory {d}: {f}: Is a directory"),
        (
            "quarantine.jsonl",
            "pipe",
            "cannot open the run directory {d}: {f}: it is a named pipe (FIFO), not a file",
        ),
        (
            "quarantine.jsonl.partial",
            "folder",
            "cannot open the run directory {d}: {f}: Is a directory",
        ),
        (
            "quarantine.jsonl.partial",
            "pipe",
            "cannot open the run directory {d}: {f}: it is a named pipe (FIFO), not a file",
        ),
    ],
)
def test_validate_refuses_a_file_of_the_run_directory_a_run_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, kind: str, error: str
) -> None:
    # validate said ok; run then refused (exit 3), naming the run directory but not the file.
    path = write_config(tmp_path, samples=2)
    run_dir = tmp_path / "runs" / "cli"
    run_dir.mkdir(parents=True)
    if kind == "folder":
        (run_dir / name).mkdir()
    else:
        os.mkfifo(run_dir / name)
    err = both_refuse(path, capsys)
    assert err == "error: " + error.format(d=run_dir, f=run_dir / name) + "\n"


@pytest.mark.parametrize(
    ("setup", "denied", "error"),
    [
        # output_dir read-only: the run directory cannot be made in it.
        ("", "runs", "cannot create the run directory {d}: Permission denied"),
        # The run directory read-only (555): the lock cannot be made.
        ("d", "runs/cli", "cannot write in the run directory {d} (run.lock): Permission denied"),
        # ... or, with the lock and journal there, the manifest.
        ("d,run.lock,journal.jsonl", "runs/cli", "cannot open the run directory {d}: "
         "Permission denied"),
        ("d,run.lock", "runs/cli/run.lock", "cannot write in the run directory {d} (run.lock): "
         "Permission denied"),
        ("d,journal.jsonl", "runs/cli/journal.jsonl", "cannot open the run directory {d}: "
         "{d}/journal.jsonl: Permission denied"),
        ("d,images/", "runs/cli/images", "cannot open the run directory {d}: {d}/images: "
         "Permission denied"),
    ],
)  # fmt: skip
def test_validate_refuses_a_run_directory_a_run_cannot_write(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    denied: str,
    error: str,
) -> None:
    # validate said ok for each; run then exited 3 at its start (as a user that modes bind:
    # here the modes are faked, root passing them all).
    path = write_config(tmp_path, samples=2)
    (tmp_path / "runs").mkdir()
    run_dir = tmp_path / "runs" / "cli"
    for part in filter(None, setup.split(",")):
        if part == "d":
            run_dir.mkdir()
        elif part.endswith("/"):
            (run_dir / part).mkdir()
        else:
            (run_dir / part).write_text("")
    refused = tmp_path / denied
    allowed = os.access
    monkeypatch.setattr(
        os, "access", lambda where, mode: Path(where) != refused and allowed(where, mode)
    )
    assert main(["validate", str(path)]) == EXIT_RUN_DIR
    assert capsys.readouterr().err == "error: " + error.format(d=run_dir) + "\n"


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ("", "cannot create the run directory {d}: Read-only file system"),
        ("d", "cannot write in the run directory {d} (run.lock): Read-only file system"),
    ],
)
def test_validate_refuses_a_read_only_mount_with_the_run_s_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    error: str,
) -> None:
    # validate said "Permission denied" where run met "Read-only file system" (the mount
    # faked: the folder of run directories and all below it read-only, as access says).
    path = write_config(tmp_path, samples=2)
    runs = tmp_path / "runs"
    runs.mkdir()
    if setup == "d":
        (runs / "cli").mkdir()
    mounted = os.statvfs

    def statvfs(where: Any) -> os.statvfs_result:
        found = mounted(where)
        if not Path(where).is_relative_to(runs):
            return found
        return os.statvfs_result((*found[:8], found.f_flag | os.ST_RDONLY, found.f_namemax))

    allowed = os.access
    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(
        os,
        "access",
        lambda where, mode: (
            (not Path(where).is_relative_to(runs) or not mode & os.W_OK) and allowed(where, mode)
        ),
    )
    assert main(["validate", str(path)]) == EXIT_RUN_DIR
    assert capsys.readouterr().err == "error: " + error.format(d=runs / "cli") + "\n"


def test_a_storage_error_names_the_file_at_fault() -> None:
    # "cannot open the run directory R: Permission denied" said nothing of which file.
    run_dir = Path("/runs/p1")
    journal = PermissionError(errno.EACCES, "Permission denied", str(run_dir / "journal.jsonl"))
    assert str(storage_error(journal, f"open the run directory {run_dir}")) == (
        f"cannot open the run directory {run_dir}: {run_dir}/journal.jsonl: Permission denied"
    )
    # Not twice: the run directory itself, or a file the message names already.
    itself = PermissionError(errno.EACCES, "Permission denied", str(run_dir))
    assert str(storage_error(itself, f"open the run directory {run_dir}")) == (
        f"cannot open the run directory {run_dir}: Permission denied"
    )
    lock = PermissionError(errno.EACCES, "Permission denied", str(run_dir / "run.lock"))
    assert str(storage_error(lock, f"write in the run directory {run_dir} (run.lock)")) == (
        f"cannot write in the run directory {run_dir} (run.lock): Permission denied"
    )


def test_validate_new_run_checks_the_fresh_run_directory_it_would_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a seed change validate said "use --new-run", which it did not take.
    path = write_config(tmp_path, samples=2)
    assert main([*RUN, str(path)]) == EXIT_OK
    path.write_text(
        path.read_text().replace('output_dir = "runs"', 'output_dir = "runs"\nseed = 7')
    )
    capsys.readouterr()
    assert main(["validate", str(path)]) == EXIT_RUN_DIR
    assert "Use --new-run" in capsys.readouterr().err
    assert main(["validate", "--new-run", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    fresh = tmp_path / "runs" / "cli-2"
    assert f"writes to {fresh} (--new-run: a fresh run directory beside " in out
    assert "2 records, 2 samples to judge\n" in out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cli"]  # nothing made
    # Only that it can be made is checked: a folder of run directories that is read-only.
    allowed = os.access
    runs = tmp_path / "runs"
    monkeypatch.setattr(
        os, "access", lambda where, mode: Path(where) != runs and allowed(where, mode)
    )
    assert main(["validate", "--new-run", str(path)]) == EXIT_RUN_DIR
    assert capsys.readouterr().err == (
        f"error: cannot create the run directory {fresh}: Permission denied\n"
    )


def test_validate_retry_errors_counts_the_errors_the_run_asks_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # After a run with errors validate said "0 samples to judge" with or without the flag,
    # which it did not take, while run --retry-errors asked them again.
    path = write_config(tmp_path, samples=6, extra=", error_rate = 0.5, seed = 3")
    assert main([*RUN, str(path)]) == EXIT_OK
    lines = (tmp_path / "runs" / "cli" / "journal.jsonl").read_text().splitlines()
    errors = sum('"status":"error"' in line for line in lines)
    assert 0 < errors < len(lines)
    capsys.readouterr()
    assert main(["validate", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f", {errors} error judgements kept (--retry-errors asks them again)" in out
    assert "0 samples to judge" in out
    assert main(["validate", "--retry-errors", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f", {errors} error judgements to ask again" in out
    assert "0 samples to judge" not in out


def both_refuse_alike(path: Path, capsys: pytest.CaptureFixture[str], code: int) -> str:
    """:func:`both_refuse` for any exit code: the last error line of each, the same."""
    errors = []
    for command in (["validate"], RUN):
        assert main([*command, str(path)]) == code
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert errors[0] == errors[1]
    return errors[0]


@contextmanager
def chattr(*paths: Path, flag: str = "+i") -> Iterator[None]:
    """``chattr +i`` (immutable) on ``paths`` for the block; skipped where it cannot be set
    (not root, a file system without attributes)."""
    done: list[Path] = []
    try:
        for path in paths:
            if subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode:
                pytest.skip("chattr cannot set attributes here (root on ext4 needed)")
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", flag.replace("+", "-"), str(path)], check=True)


@pytest.mark.parametrize("kind", ["file", "dangling link", "link to itself"])
def test_validate_new_run_passes_over_what_stands_at_the_run_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    # validate --new-run refused it ("cannot create the run directory .../cli: File exists")
    # while run --new-run took cli-2, as it takes the next name past any taken one.
    path = write_config(tmp_path, samples=2)
    runs = tmp_path / "runs"
    runs.mkdir()
    if kind == "file":
        (runs / "cli").write_text("")
    else:
        (runs / "cli").symlink_to("nowhere" if kind == "dangling link" else "cli")
    assert main(["validate", "--new-run", str(path)]) == EXIT_OK
    assert f"writes to {runs / 'cli-2'} (--new-run" in capsys.readouterr().out
    assert main([*RUN, "--new-run", str(path)]) == EXIT_OK
    assert (runs / "cli-2" / "journal.jsonl").is_file()


@pytest.mark.parametrize("name", ["quarantine.jsonl", "manifest.json"])
def test_a_file_the_run_cannot_replace_is_refused_before_judging_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # validate said ok; run judged everything, then exited 3 blaming the .partial list (or
    # the manifest's temporary file), at the end of every resume.
    path = write_config(tmp_path, samples=2)
    assert main([*RUN, str(path)]) == EXIT_OK
    path.write_text(path.read_text().replace("prompts.json", "more.json"))
    write_prompts(tmp_path / "more.json", 4)  # work left: two samples to judge
    run_dir = tmp_path / "runs" / "cli"
    lines = (run_dir / "journal.jsonl").read_text()
    capsys.readouterr()
    with chattr(run_dir / name):
        err = both_refuse(path, capsys)
    assert err == (
        f"error: cannot open the run directory {run_dir}: {run_dir / name}: "
        "Operation not permitted\n"
    )
    assert (run_dir / "journal.jsonl").read_text() == lines  # nothing judged
    assert not (run_dir / "quarantine.jsonl.partial").exists()


@pytest.mark.parametrize("attribute", ["chattr +a", "told by unchangeable"])
def test_an_append_only_journal_with_a_torn_tail_is_refused_alike_before_anything_changes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    attribute: str,
) -> None:
    # validate said ok; every run rewrote the manifest, then failed with a bare
    # "journal.jsonl: Operation not permitted": an append-only journal takes lines, but
    # its torn last line cannot be cut off.
    path = write_config(tmp_path, samples=2)
    assert main([*RUN, str(path)]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    journal = run_dir / "journal.jsonl"
    with journal.open("ab") as handle:
        handle.write(b'{"schema_ver')  # a crash's torn tail
    kept = {name: (run_dir / name).read_bytes() for name in ("journal.jsonl", "manifest.json")}
    capsys.readouterr()
    if attribute == "chattr +a":
        with chattr(journal, flag="+a"):
            err = both_refuse(path, capsys)
    else:

        def told(file: Path) -> bool:  # the journal's attributes, as run and validate see them
            return file == journal or unchangeable(file)

        monkeypatch.setattr("trig_stream.journal.unchangeable", told)
        err = both_refuse(path, capsys)
    assert err == f"error: {torn_tail_kept(journal, 12)}\n"
    assert "chattr -a" in err
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_a_temporary_image_a_run_cannot_remove_is_named_alike_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # A finished run stopped at it (exit 3, "cannot open the run directory .../.partial/
    # .x.png.99999.1.tmp: Operation not permitted", nothing to judge) while validate said ok.
    path = write_config(tmp_path, samples=2)
    assert main([*RUN, str(path)]) == EXIT_OK
    partial = tmp_path / "runs" / "cli" / "images" / ".partial"
    leftover = partial / ".x.png.99999.1.tmp"
    leftover.write_bytes(b"half a png")
    said = (
        f"{partial} holds 1 temporary image(s) left by a crash that cannot be removed (the "
        f"first: {leftover.name}: Operation not permitted): left in place"
    )
    with chattr(partial), caplog.at_level("WARNING", logger="trig_stream.run_dir_access"):
        for command in (["validate"], RUN):
            caplog.clear()
            assert main([*command, str(path)]) == EXIT_OK, capsys.readouterr().err
            assert said in caplog.text
    assert leftover.exists()


def test_a_quarantine_list_that_cannot_be_replaced_is_named() -> None:
    # "cannot replace .../quarantine.jsonl: .../quarantine.jsonl.partial: ...": the rename
    # names the file it moves, not the one it could not replace.
    run_dir = Path("/runs/cli")
    moved = PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(run_dir / "x.partial"))
    run = RunDir(run_dir)
    run._quarantine = io.BytesIO()
    replace = mock.patch.object(os, "replace", side_effect=moved)
    with replace, pytest.raises(RunDirError) as refused:
        run.finish_quarantine()
    assert str(refused.value) == (
        f"cannot replace {run_dir}/quarantine.jsonl: Operation not permitted"
    )


def test_write_atomic_names_the_file_it_cannot_replace(tmp_path: Path) -> None:
    # The manifest's error named its temporary file (.manifest.json.<pid>.<thread>.tmp).
    target = tmp_path / "manifest.json"

    def refuse(source: object, destination: object) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(source))

    with mock.patch.object(os, "replace", refuse), pytest.raises(PermissionError) as refused:
        write_atomic(target, b"{}")
    assert refused.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # no temporary left


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ("images=file", "{i}: {i} is a file; it must be a folder of the run's images: move or "
         "remove it"),
        ("images/t2i/synth-b=file", "{i}: {i}/t2i/synth-b is a file; it must be a folder of the "
         "run's images: move or remove it"),
        ("images/t2i=immutable", "{i}: {i}/t2i/synth-b: Operation not permitted"),
        ("images/.partial=immutable", "{i}: {i}/.partial: Operation not permitted"),
        # images/ on a disk not mounted: validate said ok, run called the link a "special file".
        ("images=dangling link", "{i}: {i} is a symbolic link to {t}, which does not exist: it "
         "points nowhere; make its target, point it at a folder, or remove it"),
        ("images=link to a file", "{i}: {i} is a file; it must be a folder of the run's images: "
         "move or remove it"),
    ],
)  # fmt: skip
def test_validate_refuses_image_folders_the_run_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, error: str
) -> None:
    # validate said ok; run stopped at its first image with "File exists" (which said
    # nothing of what was in the way) or "Operation not permitted".
    path = write_config(tmp_path, samples=2)
    assert main([*RUN, str(path)]) == EXIT_OK
    text = path.read_text()
    second = '[[generators]]\nname = "synth-b"\nbackend = "synthetic"\noptions = { size = 16 }\n'
    path.write_text(text.replace("[[judges]]", second + "\n[[judges]]"))
    images = tmp_path / "runs" / "cli" / "images"
    where, what = setup.split("=")
    target = tmp_path / "runs" / "cli" / where
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"  # a link's target
    if what == "file":
        if target == images:
            shutil.rmtree(images)
        target.write_text("")
        err = both_refuse_alike(path, capsys, EXIT_RUN_DIR)
    elif what.startswith(("dangling", "link")):
        shutil.rmtree(target)
        if what == "link to a file":
            elsewhere.write_text("")
        target.symlink_to(elsewhere)
        err = both_refuse_alike(path, capsys, EXIT_RUN_DIR)
    else:
        target.mkdir(exist_ok=True)
        with chattr(target):
            err = both_refuse_alike(path, capsys, EXIT_RUN_DIR)
    assert err == "error: cannot write images in " + error.format(i=images, t=elsewhere)


def test_an_image_folder_with_no_work_left_is_not_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only the folders the run writes in are looked at: a finished one may be read-only.
    path = write_config(tmp_path, samples=2)
    assert main([*RUN, str(path)]) == EXIT_OK
    images = tmp_path / "runs" / "cli" / "images" / "t2i"
    with chattr(images):
        assert main(["validate", str(path)]) == EXIT_OK
        assert main([*RUN, str(path)]) == EXIT_OK


def finished_run_less_its_last_sample(tmp_path: Path) -> tuple[Path, list[str], str]:
    """A run of 3 samples made to the end, then its last sample's judgements taken out of the
    journal: its config, the journal's lines as they were, and that sample's data_id."""
    path = write_config(tmp_path, samples=3)
    assert main([*RUN, str(path)]) == EXIT_OK
    journal = tmp_path / "runs" / "cli" / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    unjudged = json.loads(lines[-1])["data_id"]
    journal.write_text("".join(x for x in lines if json.loads(x)["data_id"] != unjudged))
    return path, lines, unjudged


def test_image_folders_are_not_refused_when_every_image_left_is_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # validate refused the image folders of a model with a sample left to judge (exit 3),
    # though its image was on disk: run reuses it and writes nothing (exit 0).
    path, lines, unjudged = finished_run_less_its_last_sample(tmp_path)
    run_dir = tmp_path / "runs" / "cli"
    journal = run_dir / "journal.jsonl"
    images = run_dir / "images"
    assert (images / "t2i" / "synth" / f"{unjudged}.png").is_file()
    capsys.readouterr()
    with chattr(images / "t2i" / "synth", images / ".partial"):
        assert main(["validate", str(path)]) == EXIT_OK
        assert "1 sample to judge" in capsys.readouterr().out
        assert main([*RUN, str(path)]) == EXIT_OK
        assert unjudged in journal.read_text()
    # An image missing: the run makes it, in a folder it cannot write; both refuse that.
    (images / "t2i" / "synth" / f"{unjudged}.png").unlink()
    journal.write_text("".join(x for x in lines if json.loads(x)["data_id"] != unjudged))
    capsys.readouterr()
    with chattr(images / "t2i" / "synth", images / ".partial"):
        err = both_refuse_alike(path, capsys, EXIT_RUN_DIR)
    assert err.startswith(f"error: cannot write images in {images}: ")


def test_a_folder_where_an_image_goes_is_refused_alike_before_its_picture_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # validate said ok; run judged the others, then exited 3 "Is a directory" on writing
    # the picture made for it, and so did every resume.
    path, _, unjudged = finished_run_less_its_last_sample(tmp_path)
    run_dir = tmp_path / "runs" / "cli"
    journal = run_dir / "journal.jsonl"
    image = run_dir / "images" / "t2i" / "synth" / f"{unjudged}.png"
    image.unlink()
    image.mkdir()
    kept = journal.read_text()
    capsys.readouterr()
    made = mock.Mock(side_effect=AssertionError("a picture was made"))
    monkeypatch.setattr(SyntheticGenerator, "generate", made)
    err = both_refuse_alike(path, capsys, EXIT_RUN_DIR)
    assert err == (
        f"error: cannot write images in {run_dir / 'images'}: {image} is a folder; the run "
        "writes an image file there: move or remove it"
    )
    assert image.is_dir()
    assert journal.read_text() == kept


def test_validate_lists_each_model_s_images_once_rather_than_looking_at_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A look at each image to make, for every sample and model, made validate of 60k samples
    # take 7-10 s instead of 4.4-5 s.
    path = write_config(tmp_path, samples=6)
    assert main([*RUN, str(path)]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    images = run_dir / "images" / "t2i" / "synth"
    journal = run_dir / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    unjudged = sorted({json.loads(line)["data_id"] for line in lines})[:4]
    journal.write_text("".join(x for x in lines if json.loads(x)["data_id"] not in unjudged))
    for data_id in unjudged[:2]:  # two to make again, two on disk to reuse
        (images / f"{data_id}.png").unlink()
    looked_at: list[str] = []
    for name in ("stat", "lstat"):
        look = getattr(os, name)

        def spied(where: Any, *args: Any, look: Any = look, **kwargs: Any) -> os.stat_result:
            if str(where).endswith(".png"):
                looked_at.append(str(where))
            return look(where, *args, **kwargs)  # type: ignore[no-any-return]

        monkeypatch.setattr(os, name, spied)
    capsys.readouterr()
    assert main(["validate", str(path)]) == EXIT_OK
    assert "4 samples to judge" in capsys.readouterr().out
    assert looked_at == []


@pytest.mark.parametrize(
    ("written", "what"),
    [
        ("imgs", "missing"),
        ("imgs", "file"),
        ("imgs", "unreadable"),
        ("../elsewhere/imgs", "missing"),
        ("~/imgs", "missing"),
    ],
)
def test_a_refused_image_folder_is_named_as_the_config_wrote_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    written: str,
    what: str,
) -> None:
    # Both named it by its resolved path alone (/abs/project/imgs), not the "imgs" of the
    # config, relative to the config's folder.
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_config(project, samples=2)
    made = '[[generators]]\nname = "made"\nbackend = "image_folder"\n'
    made += f'options = {{ path = "{written}" }}\n\n'
    path.write_text(path.read_text().replace("[[generators]]", made + "[[generators]]", 1))
    elsewhere = {"~/imgs": tmp_path / "home", "../elsewhere/imgs": tmp_path / "elsewhere"}
    folder = elsewhere.get(written, project) / "imgs"
    if what == "file":
        folder.write_text("")
    elif what == "unreadable":  # root lists any folder: refused where it is opened
        folder.mkdir()
        listed = os.scandir

        def scandir(where: Any = ".") -> Any:
            if Path(where) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(where))
            return listed(where)

        monkeypatch.setattr(os, "scandir", scandir)
    err = both_refuse_alike(path, capsys, EXIT_FATAL)
    why = "cannot be read" if what == "unreadable" else "does not exist or is not a folder"
    assert f"image folder {written} (that is {folder}) {why}" in err


def test_an_image_folder_copied_with_another_path_is_named_by_that_path(tmp_path: Path) -> None:
    # A loaded config copied with another folder (as an embedding application copies it):
    # its message named the folder as the file wrote it, "imgs (that is /elsewhere/other)".
    path = write_config(tmp_path, samples=2)
    made = '[[generators]]\nname = "made"\nbackend = "image_folder"\noptions = { path = "imgs" }\n'
    path.write_text(path.read_text().replace("[[generators]]", made + "[[generators]]", 1))
    config = load_config(path)
    entry = config.generators[0]
    other = tmp_path / "elsewhere" / "other"
    copied = entry.model_copy(update={"options": {**entry.options, "path": str(other)}})
    generators = [copied, *config.generators[1:]]
    config = config.model_copy(update={"generators": generators}).resolve_paths(tmp_path)
    assert config.generators[0].written_options == {"path": str(other)}
    named = f"^generator 'made': image folder {other} does not exist"
    with pytest.raises(FatalBackendError, match=named):
        build_generator(config.generators[0], config).check_environment()


@pytest.mark.timeout(60)  # a pipe as the journal was waited on for ever
@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_a_journal_that_is_no_file_is_refused_in_the_journal_s_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    # validate said "cannot open the run directory D: D/journal.jsonl: Is a directory".
    path = write_config(tmp_path, samples=2)
    run_dir = tmp_path / "runs" / "cli"
    run_dir.mkdir(parents=True)
    if kind == "folder":
        (run_dir / "journal.jsonl").mkdir()
    else:
        os.mkfifo(run_dir / "journal.jsonl")
    err = both_refuse(path, capsys)
    assert err == (
        f"error: cannot read the journal {run_dir}/journal.jsonl: it is not a regular file (a "
        "folder, a pipe or a device?); it must be the file a run wrote\n"
    )


@pytest.mark.parametrize(
    ("immutable", "error"),
    [
        ("runs", "cannot create the run directory {d}: Operation not permitted"),
        ("runs/cli", "cannot open the run directory {d}: Operation not permitted"),
        ("runs/cli/run.lock", "cannot write in the run directory {d} (run.lock): Operation not "
         "permitted"),
        ("runs/cli/journal.jsonl", "cannot open the run directory {d}: {d}/journal.jsonl: "
         "Operation not permitted"),
    ],
)  # fmt: skip
def test_an_immutable_folder_or_file_is_refused_with_the_run_s_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], immutable: str, error: str
) -> None:
    # validate made up "Permission denied" where the run met "Operation not permitted".
    path = write_config(tmp_path, samples=2)
    run_dir = tmp_path / "runs" / "cli"
    if immutable == "runs":
        (tmp_path / "runs").mkdir()
    else:
        assert main([*RUN, str(path)]) == EXIT_OK
    capsys.readouterr()
    with chattr(tmp_path / immutable):
        err = both_refuse(path, capsys)
    assert err == "error: " + error.format(d=run_dir) + "\n"


def test_an_output_dir_through_a_link_that_loops_is_refused_with_the_run_s_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # validate said "Not a directory" for any link on the way; the run met the loop.
    path = write_config(tmp_path, samples=2)
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    path.write_text(path.read_text().replace('"runs"', f'"{loop}/runs"'))
    err = both_refuse(path, capsys)
    assert err == (
        f"error: cannot create the run directory {loop}/runs/cli: {loop} is a symbolic link "
        "(to loop) that loops back to itself; point it at a folder or remove it\n"
    )


def test_validate_warns_of_journal_lines_that_are_no_judgements_as_the_run_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, samples=2)
    assert main([*RUN, str(path)]) == EXIT_OK
    journal = tmp_path / "runs" / "cli" / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([lines[0], b"garbage\n", b"\xff\xfe\n", *lines[1:]]))
    warning = (
        f"{journal}: 2 line(s) are not judgements and were skipped (the first: line 2: Invalid "
        "JSON: expected value at line 1 column 1)"
    )
    caplog.clear()
    assert main(["validate", str(path)]) == EXIT_OK
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [warning]
    caplog.clear()
    assert main([*RUN, str(path)]) == EXIT_OK
    assert warning in [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_validate_refuses_a_serve_port_something_listens_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # validate said ok; run exited 4 when it started the judge's server.
    path = write_config(tmp_path, samples=2)
    base = path.read_text().split("[[judges]]")[0]
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        serve = f'{{ command = ["{sys.executable}", "{{port}}"], port = {port} }}'
        judge = '[[judges]]\nname = "j"\nbackend = "openai"\n'
        judge += f'options = {{ model = "m", serve = {serve} }}\n'
        path.write_text(base + judge)
        err = both_refuse_alike(path, capsys, EXIT_FATAL)
    assert f"judge 'j': cannot start its server on 127.0.0.1:{port}: " in err
    assert "another server listening there?" in err


def with_a_served_judge(tmp_path: Path) -> tuple[Path, int]:
    """A config of one sample whose judge ``j`` is served by the simulated judge at a port
    free now, and that port."""
    path = write_config(tmp_path, samples=1)
    base = path.read_text().split("[[judges]]")[0]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    argv = f'["{sys.executable}", "-m", "trig_stream", "simulate-judge", "--port", "{{port}}"]'
    serve = f"{{ command = {argv}, port = {port}, poll_interval_s = 0.05 }}"
    judge = '[[judges]]\nname = "j"\nbackend = "openai"\n'
    path.write_text(base + judge + f'options = {{ model = "m", serve = {serve} }}\n')
    return path, port


@pytest.mark.timeout(120)
def test_a_busy_serve_port_is_no_reason_to_refuse_a_run_with_nothing_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # validate refused the port (exit 4) of a finished run, which `run` resumes without
    # starting its server: nothing is left to judge (exit 0).
    path, port = with_a_served_judge(tmp_path)
    assert main([*RUN, str(path)]) == EXIT_OK
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the server's TIME_WAIT
        other.bind(("127.0.0.1", port))
        other.listen()
        for command in (["validate"], RUN):
            assert main([*command, str(path)]) == EXIT_OK, capsys.readouterr().err
        # A sample left to judge: the run starts the server, and both refuse the port.
        write_prompts(tmp_path / "prompts.json", 2)
        capsys.readouterr()
        err = both_refuse_alike(path, capsys, EXIT_FATAL)
    assert f"judge 'j': cannot start its server on 127.0.0.1:{port}: " in err


HOLDER = """\
import pathlib, sys
import anyio
from trig_stream import manifest, store
from trig_stream.backends.judges.managed_server import ManagedServer, ServeOptions

path, port = pathlib.Path(sys.argv[1]), int(sys.argv[2])
run, _ = store.RunDir.open(path, manifest.read_manifest(path))


async def hold() -> None:
    command = [sys.executable, "-m", "trig_stream", "simulate-judge", "--port", "{port}"]
    options = {"command": command, "port": port, "poll_interval_s": 0.05}
    server = ManagedServer(ServeOptions.model_validate(options), name="j")
    await server.start()
    try:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
    finally:
        await server.aclose()


anyio.run(hold)
"""
"""A run going on in the run directory ``argv[1]``: its lock held, its judge's server (the
simulated judge) listening at port ``argv[2]``; it says ``ready``, and ends when its stdin
closes."""


@pytest.mark.timeout(120)
def test_a_running_runs_serve_port_is_refused_as_the_run_dir_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The port was checked before the run directory: a second run or validate of a run still
    # going, whose server holds the port, said "cannot start its server ... Address already in
    # use" (exit 4), not that another process runs there (exit 3).
    path, port = with_a_served_judge(tmp_path)
    assert main([*RUN, str(path)]) == EXIT_OK  # the run that is resumed below
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "cli"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        for command in (["validate"], RUN):
            assert main([*command, str(path)]) == EXIT_RUN_DIR
            err = " ".join(capsys.readouterr().err.split())
            assert f"{run_dir} is in use by another trig-stream process (pid {holder.pid})" in err
            assert "wait for it to end, or use `trig-stream watch`" in err
            assert "cannot start its server" not in err
        # With --new-run, the run goes to a fresh directory: the port is why it would fail.
        assert main(["validate", "--new-run", str(path)]) == EXIT_FATAL
        err = capsys.readouterr().err
        assert f"judge 'j': cannot start its server on 127.0.0.1:{port}: " in err
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert main(["validate", str(path)]) == EXIT_OK  # the run and its server have ended
