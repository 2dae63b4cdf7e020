"""``validate`` and ``run`` agree on a run directory that cannot be looked up or written, and
``validate`` takes ``run``'s ``--new-run`` and ``--retry-errors``."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.test_cli import write_config
from trig_stream.cli import main
from trig_stream.exit_codes import EXIT_OK, EXIT_RUN_DIR
from trig_stream.files import storage_error

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
