"""Odd paths: symbolic links that loop or point nowhere, on the way to what a config or a
command names. Each is one error naming the link, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import home_and_work_folders
from tests.test_analysis_commands import FORMATTED, formatted_as_evaluation, write_run_dir
from tests.test_cli import write_config
from trig_stream.cli import _parse, main
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_FATAL, EXIT_OK, EXIT_RUN_DIR
from trig_stream.files import locale_problem

LOOPS = "Too many levels of symbolic links"


def loop(folder: Path) -> Path:
    """``folder/loop1`` -> ``loop2`` -> ``loop1``."""
    (folder / "loop2").symlink_to("loop1")
    (folder / "loop1").symlink_to("loop2")
    return folder / "loop1"


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return " ".join(text.split())


def test_a_relative_config_path_through_a_loop_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (base / path).resolve() raised RuntimeError("Symlink loop ..."): a traceback, exit 1.
    config = write_config(tmp_path, samples=2)
    looped = loop(tmp_path)
    text = config.read_text()
    config.write_text(text.replace('path = "prompts.json"', 'path = "loop1"'))
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_FATAL
        assert f"dataset {looped} cannot be looked up: {LOOPS}" in one_error(capsys)
    config.write_text(text.replace('output_dir = "runs"', 'output_dir = "loop1"'))
    for command in (["validate"], ["run", "--headless"], ["run", "--headless", "--new-run"]):
        assert main([*command, str(config)]) == EXIT_RUN_DIR
        err = one_error(capsys)
        assert f"{looped} is a symbolic link (to loop2) that loops back to itself" in err
        assert "remove it" in err
    config.write_text(
        text.replace('backend = "synthetic"\noptions = { size = 16 }', "")
        .replace('name = "synth"', 'name = "synth"\nbackend = "image_folder"')
        .replace("[[judges]]", 'options = { path = "loop1" }\n[[judges]]')
    )
    assert main(["validate", str(config)]) == EXIT_FATAL
    assert f"image folder loop1 (that is {looped}) " in one_error(capsys)


def test_a_run_directory_that_is_a_dangling_link_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "cannot create the run directory .../runs/syn: File exists": the link was the fault.
    config = write_config(tmp_path, samples=2)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "cli").symlink_to("../../other/nothere")
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_RUN_DIR
        err = one_error(capsys)
        assert (
            f"cannot create the run directory {tmp_path / 'runs' / 'cli'}: "
            f"{tmp_path / 'runs' / 'cli'} is a symbolic link to ../../other/nothere, which "
            "does not exist: it points nowhere"
        ) in err
        assert "File exists" not in err


def test_analysis_paths_through_a_loop_are_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, samples=2)
    assert main(["run", str(config), "--headless", "--no-report"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    looped = loop(tmp_path)
    capsys.readouterr()
    assert main(["compare", str(looped / "cli"), str(run_dir)]) != EXIT_OK
    assert f"{looped / 'cli'}/manifest.json: {LOOPS}" in one_error(capsys)
    assert main(["compare", str(run_dir), str(run_dir), "--out", str(looped)]) != EXIT_OK
    one_error(capsys)
    analyze = ["analyze", str(FORMATTED), "--out", str(looped), "--no-plots"]
    assert main(analyze) == EXIT_RUN_DIR
    err = one_error(capsys)
    assert f"{looped} is a symbolic link (to loop2) that loops back to itself" in err
    assert "File exists" not in err
    evaluation = tmp_path / "evaluation_result.json"
    evaluation.write_text(json.dumps(formatted_as_evaluation()[0]))
    out = tmp_path / "out"
    assert main(["analyze", str(evaluation), "--out", str(out), "--prompts", str(looped)]) != 0
    assert f"dataset {looped} cannot be looked up: {LOOPS}" in one_error(capsys)


def test_a_moved_project_whose_old_place_is_a_loop_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Move.between resolved the manifest's old paths: a loop there was a traceback.
    first = tmp_path / "P1"
    first.mkdir()
    config = write_config(first, samples=2)
    assert main(["run", str(config), "--headless", "--no-report"]) == EXIT_OK
    first.rename(tmp_path / "P2")
    first.symlink_to("P1")
    capsys.readouterr()
    assert main(["run", str(tmp_path / "P2" / config.name), "--headless", "--no-report"]) == 0
    assert "done: 0 judgements" in one_error(capsys)


def test_a_path_error_of_a_linked_config_says_where_relative_paths_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A/c.toml -> ../B/c.toml: "dataset .../A/prompts.json does not exist" while the dataset
    # lies beside the linked file, in B, with nothing saying why A was looked in.
    linked = tmp_path / "B"
    linked.mkdir()
    config = write_config(linked, samples=2)
    (tmp_path / "A").mkdir()
    link = tmp_path / "A" / "run.toml"
    link.symlink_to(Path("..", "B", config.name))
    assert main(["validate", str(link)]) == EXIT_FATAL
    err = one_error(capsys)
    assert f"dataset {tmp_path / 'A' / 'prompts.json'} does not exist" in err
    assert (
        f"(config {link} is a symbolic link to a file in {linked}: its relative paths are "
        f"read from the link's folder, {tmp_path / 'A'}, not the linked file's)"
    ) in err
    assert main(["validate", str(config)]) == EXIT_OK  # the file itself: no such clause
    assert "symbolic link" not in one_error(capsys)


def test_a_linked_config_whose_paths_climb_out_of_its_folder_says_so_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As every shipped config's (`../data/...`): the error named A/data/prompts.json, which
    # holds not the link's folder A/x (the `..` resolved away), and the clause was left out.
    folder = tmp_path / "B" / "config"
    folder.mkdir(parents=True)
    config = write_config(folder, samples=2)
    text = config.read_text().replace('"prompts.json"', '"../data/prompts.json"')
    config.write_text(text.replace('"runs"', '"../runs"'))
    (tmp_path / "A" / "x").mkdir(parents=True)
    link = tmp_path / "A" / "x" / "run.toml"
    link.symlink_to(Path("..", "..", "B", "config", config.name))
    assert main(["validate", str(link)]) == EXIT_FATAL
    err = one_error(capsys)
    assert f"dataset {tmp_path / 'A' / 'data' / 'prompts.json'} does not exist" in err
    assert (
        f"(config {link} is a symbolic link to a file in {folder}: its relative paths are "
        f"read from the link's folder, {tmp_path / 'A' / 'x'}, not the linked file's)"
    ) in err
    # A link whose paths lead where the linked file's do: the clause would mislead.
    (tmp_path / "B" / "other").mkdir()
    beside = tmp_path / "B" / "other" / "run.toml"
    beside.symlink_to(Path("..", "config", config.name))
    assert main(["validate", str(beside)]) == EXIT_FATAL
    err = one_error(capsys)
    assert f"dataset {tmp_path / 'B' / 'data' / 'prompts.json'} does not exist" in err
    assert "symbolic link" not in err


def in_ascii_locale(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Python ``code`` in a child whose file-name encoding is ASCII (the C locale without
    UTF-8 mode), ``args`` as its sys.argv[1:]."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="backslashreplace",
        timeout=120,
        check=False,
    )


CLI = "import sys\nfrom trig_stream.cli import main\nsys.exit(main(sys.argv[1:]))\n"
ENTRY_POINT = "from trig_stream.console import entry_point\nentry_point()\n"


def test_a_path_this_locale_cannot_name_is_one_error(tmp_path: Path) -> None:
    # With an ASCII file-name encoding a config in "w é/" (its paths resolved) was a
    # UnicodeEncodeError traceback, or, read as surrogates, called not UTF-8 when it was.
    probe = in_ascii_locale("import sys; print(sys.getfilesystemencoding())")
    if probe.stdout.strip() == "utf-8":
        pytest.skip("this Python keeps UTF-8 file names in the C locale")
    folder = tmp_path / "w é 中文"
    folder.mkdir()
    config = write_config(folder, samples=2)
    ascii_config = write_config(tmp_path, samples=2)
    ascii_config.write_text(
        ascii_config.read_text().replace('path = "prompts.json"', 'path = "données.json"')
    )
    for argv in (["validate", str(config)], ["validate", str(ascii_config)]):
        done = in_ascii_locale(CLI, *argv)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == EXIT_CONFIG, done.stderr
        text = " ".join(done.stderr.split())
        assert "this path cannot be used in this locale, whose file-name encoding is" in text
        assert "run in a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1)" in text
    # A library call writing such a name (its temporary file named after it) works.
    write = "import sys\nfrom pathlib import Path\nfrom trig_stream.files import write_atomic\n"
    done = in_ascii_locale(write + "write_atomic(Path(sys.argv[1]), b'x')\n", str(tmp_path / "é"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "é").read_bytes() == b"x"


def test_a_command_line_path_this_locale_reads_as_surrogates_is_used(tmp_path: Path) -> None:
    # With an ASCII file-name encoding the command line's non-ASCII bytes come as
    # surrogates, which name the same file again: every read-only command refused such a
    # run directory ("this path cannot be used in this locale"), exit 2.
    probe = in_ascii_locale("import sys; print(sys.getfilesystemencoding())")
    if probe.stdout.strip() == "utf-8":
        pytest.skip("this Python keeps UTF-8 file names in the C locale")
    run = write_run_dir(tmp_path / "r é 中文", {})
    for argv in (
        ["status", str(run)],
        ["compare", str(run), "--out", str(tmp_path / "cmp é.md")],
        ["report", str(run), "--no-plots", "--out", str(tmp_path / "rép")],
    ):
        # The command's own entry point: what the locale cannot print comes as escapes.
        done = in_ascii_locale(ENTRY_POINT, *argv)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == EXIT_OK, done.stdout + done.stderr
    assert (tmp_path / "cmp é.md").is_file()
    assert (tmp_path / "rép" / "comparison.md").is_file()


@pytest.mark.parametrize(
    ("path", "encoding", "refused"),
    [
        ("proj_café/prompts.json", "iso8859-1", False),  # Latin-1 holds é
        ("données.json", "ascii", True),  # a config's text the encoding cannot hold
        ("w 中文/prompts.json", "iso8859-1", True),
        ("r \udcc3\udca9", "ascii", False),  # the command line's bytes, as surrogates
        ("données.json", "utf-8", False),
        ("plain/ascii.json", "ascii", False),
    ],
)
def test_a_path_is_refused_only_when_the_locale_cannot_encode_it(
    monkeypatch: pytest.MonkeyPatch, path: str, encoding: str, refused: bool
) -> None:
    # Any non-ASCII path was refused when the encoding was not UTF-8: a project in
    # proj_café/ failed `run` in a Latin-1 locale.
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: encoding)
    problem = locale_problem(path)
    assert (problem is not None) == refused, problem
    if problem is not None:
        assert f"whose file-name encoding is {encoding}, not UTF-8" in problem


@pytest.mark.parametrize("command", ["report", "compare", "analyze"])
def test_an_out_with_a_leading_tilde_is_the_home_folder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    # --out=~/rep (no shell expands ~ after "=") wrote a folder literally named "~" in the
    # current folder, which a later `rm -rf ~` would take for the home folder.
    home, work = home_and_work_folders(tmp_path, monkeypatch)
    run = write_run_dir(tmp_path / "r1", {})
    argv = {
        "report": ["report", str(run), "--no-plots", "--out=~/rep"],
        "compare": ["compare", str(run), "--out=~/rep/cmp.md"],
        "analyze": ["analyze", str(FORMATTED), "--no-plots", "--out=~/rep"],
    }[command]
    assert main(argv) == EXIT_OK, one_error(capsys)
    assert not (work / "~").exists()
    assert any((home / "rep").iterdir())


@pytest.mark.parametrize(
    ("argv", "dest"),
    [
        (["run", "~/r"], "config"),
        (["validate", "~/r"], "config"),
        (["status", "~/r"], "run_dir"),
        (["watch", "~/r"], "run_dir"),
        (["report", "~/r"], "run_dir"),
        (["analyze", "~/r", "--out=/o", "--prompts=~/r"], "file"),
        (["analyze", "/f", "--out=/o", "--prompts=~/r"], "prompts"),
        (["compare", "/a", "~/r"], "run_dirs"),
        (["import-config", "~/r"], "yaml"),
        (["import-config", "/u.yaml", "--root=~/r"], "root"),
        (["import-config", "/u.yaml", "-o~/r"], "out"),
        (["make-tiny-models", "~/r"], "out"),
        (["simulate-judge", "--allowed-local-media-path=~/r"], "allowed_local_media_path"),
    ],
)
def test_every_path_on_the_command_line_takes_a_leading_tilde_for_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], dest: str
) -> None:
    # Only report's, analyze's and compare's --out expanded it: `import-config --out=~/x.toml`
    # (the shell expands no ~ after "=") or a quoted "~/r" wrote or read a folder named "~".
    monkeypatch.setenv("HOME", str(tmp_path))
    parsed = getattr(_parse(argv), dest)
    assert (parsed[-1] if isinstance(parsed, list) else parsed) == tmp_path / "r"
