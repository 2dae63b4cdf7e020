"""Symbolic links planted in a run directory: a run, a resume and a report refuse them
rather than writing, or removing, what they point to outside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_analysis_commands import write_run_dir
from tests.test_cli import write_config
from trig_stream.analysis.report import MODEL_FILES
from trig_stream.cli import main
from trig_stream.errors import RunDirError
from trig_stream.exit_codes import EXIT_OK, EXIT_RUN_DIR
from trig_stream.journal import JOURNAL, Journal


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes, by relative name."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def outside(tmp_path: Path) -> Path:
    """A folder outside the run directory holding a file the user keeps."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "p.txt").write_text("precious\n")
    return folder


def refused(err: str, link: Path) -> None:
    """The error names the link and says what to do."""
    text = " ".join(err.split())
    assert f"{link} is a symbolic link" in text
    assert "remove it" in text or "remove the link" in text


@pytest.fixture
def finished_run(tmp_path: Path) -> tuple[Path, Path]:
    """A config and its run directory, the run finished."""
    config = write_config(tmp_path, samples=2)
    assert main(["run", str(config), "--headless", "--no-report"]) == EXIT_OK
    return config, tmp_path / "runs" / "cli"


@pytest.mark.parametrize(
    "name", ["images/.partial", "images/t2i/synth", "images/t2i", "run.lock", JOURNAL]
)
def test_a_run_refuses_a_link_among_its_files_and_touches_nothing_outside(
    tmp_path: Path,
    finished_run: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    # A resume emptied a linked images/.partial, wrote its pid into a linked run.lock,
    # appended judgements to a linked journal and wrote images into a linked image folder.
    config, run_dir = finished_run
    elsewhere = outside(tmp_path)
    link = run_dir / name
    target = elsewhere / "p.txt" if name in (JOURNAL, "run.lock") else elsewhere
    if link.is_dir():
        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.symlink_to(target)
    # More samples, so that a resume writes new images and judgements.
    write_config(tmp_path, samples=4)
    before = snapshot(elsewhere)
    capsys.readouterr()
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_RUN_DIR
        refused(capsys.readouterr().err, link)
        assert snapshot(elsewhere) == before
    assert link.is_symlink()


def test_a_journal_opened_for_appending_refuses_a_link(tmp_path: Path) -> None:
    elsewhere = outside(tmp_path)
    link = tmp_path / JOURNAL
    link.symlink_to(elsewhere / "p.txt")
    with pytest.raises(RunDirError, match="is a symbolic link"):
        Journal(link).open()
    assert (elsewhere / "p.txt").read_text() == "precious\n"


def test_a_report_refuses_a_linked_file_of_a_model_s_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run_dir(tmp_path / "run", {})
    assert main(["report", str(run), "--no-plots"]) == EXIT_OK
    elsewhere = outside(tmp_path)
    link = run / "report" / "model-a" / "report.md"
    link.unlink()
    link.symlink_to(elsewhere / "p.txt")
    capsys.readouterr()
    assert main(["report", str(run), "--no-plots"]) == EXIT_RUN_DIR
    refused(capsys.readouterr().err, link)
    assert (elsewhere / "p.txt").read_text() == "precious\n"


def test_a_report_refuses_a_linked_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run_dir(tmp_path / "run", {})
    elsewhere = outside(tmp_path)
    (run / "report").mkdir()
    link = run / "report" / "model-b"
    link.symlink_to(elsewhere)
    assert main(["report", str(run), "--no-plots"]) == EXIT_RUN_DIR
    refused(capsys.readouterr().err, link)
    assert snapshot(elsewhere) == {"p.txt": b"precious\n"}


def test_a_report_refuses_a_linked_report_folder_and_removes_nothing_through_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The report removed the "stale" model folders it found through the link: a copy of
    # another model's report kept elsewhere.
    run = write_run_dir(tmp_path / "run", {})
    kept = tmp_path / "outside" / "rep"
    (kept / "othermodel").mkdir(parents=True)
    for name in MODEL_FILES:
        (kept / "othermodel" / name).write_text("kept\n")
    before = snapshot(kept)
    link = run / "report"
    link.symlink_to(kept)
    assert main(["report", str(run), "--no-plots"]) == EXIT_RUN_DIR
    err = " ".join(capsys.readouterr().err.split())
    assert f"{link} is a symbolic link" in err and "--out" in err
    assert snapshot(kept) == before
    # Named with --out, a folder behind a link is the user's choice, and written.
    assert main(["report", str(run), "--no-plots", "--out", str(link)]) == EXIT_OK
    assert (kept / "model-a" / "report.md").is_file()
