"""The ``make-tiny-models`` command: random-weight models for the CPU demo and for trying
configs offline.

It writes, under one folder, a tiny Flux and a tiny Stable Diffusion pipeline (t2i), a tiny
InstructPix2Pix pipeline (p2p) and a tiny LLaVA judge, each loadable with
``from_pretrained(folder, local_files_only=True)`` like a real checkpoint. Their weights are
random: images are noise and scores mean nothing; they exercise the real loading and
inference code without a download or a GPU.

Each model is built in a hidden folder beside its own and renamed into place once whole: a
build cut short (Ctrl-C, a full disk) leaves no half-written model that a later run would
load, or that this command would call present.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from trig_stream.backends.tiny_model_names import TINY_MODELS
from trig_stream.path_arguments import path_argument

WRITTEN_LAST = {
    "flux": "model_index.json",
    "sd": "model_index.json",
    "instruct_pix2pix": "model_index.json",
    "vlm": "processor_config.json",
}
"""A file each model's folder holds only once whole (its builder writes it after the
weights): a folder without it, left by a build cut short before the builds were renamed
into place, is built again."""

_BUILDING = ".building-"
"""How the folder a model is built in is named: ``.<model>.building-<pid>``."""

_OLD = ".old-"
"""How a model's folder is named while a build replaces it: ``.<model>.old-<pid>``."""

_PIPELINE = frozenset({"model_index.json", "scheduler", "text_encoder", "tokenizer", "vae"})
LAYOUT: dict[str, frozenset[str]] = {
    "flux": _PIPELINE | {"text_encoder_2", "tokenizer_2", "transformer"},
    "sd": _PIPELINE | {"unet"},
    "instruct_pix2pix": _PIPELINE | {"unet"},
    "vlm": frozenset(),
}
"""The folders (and the pipelines' index) a model's folder holds, besides the files that
``save_pretrained`` writes (:data:`SAVED_SUFFIXES`): what an earlier build of it may have
left there. A folder holding anything else is the user's, never replaced without --force."""

SAVED_SUFFIXES = (".json", ".safetensors", ".jinja")
"""The files ``save_pretrained`` writes: configs, weights (and their index), chat template."""


EXIT_CANNOT_WRITE = 3
"""The output folder cannot be made (as the CLI's exit code for an unusable run directory)."""


def add_tiny_models_command(subparsers: Any) -> None:
    """Add ``make-tiny-models OUT`` to the ``trig-stream`` command."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "make-tiny-models",
        help="build random-weight tiny pipelines and a tiny VLM judge (for the CPU demo)",
    )
    parser.add_argument("out", type=_folder, metavar="OUT", help="folder to write them into")
    parser.add_argument(
        "--force", action="store_true", help="build again even when a model folder exists"
    )
    parser.set_defaults(handler=make_tiny_models)


def _folder(text: str) -> Path:
    # Path("") is the current folder: an empty OUT (an unset shell variable) built the
    # models there without a word.
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name the folder to write the models into")
    return path_argument(text)


def make_tiny_models(args: argparse.Namespace, console: Console) -> int:
    """Build every tiny model missing under ``args.out``.

    Returns:
        0, or 3 when ``args.out`` cannot hold them (a file, a folder it cannot write, or a
        disk that fills up during a build: the models built before stay whole), or when
        something other than a folder stands at a model's name.

    Raises:
        MissingExtraError: a library the models to build need is not installed (checked
            before anything is written).
    """
    from trig_stream.backends.library_logs import quiet_model_libraries

    # As `run`: no progress bars or advice from the model libraries (read as they import).
    quiet_model_libraries()
    from trig_stream.testing import tiny_pipelines, tiny_vlm
    from trig_stream.testing.tiny_pipelines import build_tiny_pipeline
    from trig_stream.testing.tiny_vlm import build_tiny_vlm

    out: Path = args.out
    # Before OUT is made: a missing library found by the first build left an empty folder.
    needed = [name for name in TINY_MODELS if args.force or not _present(out, name)]
    tiny_pipelines.require_packages(
        dict.fromkeys(
            package
            for name in needed
            for package in (tiny_vlm.PACKAGES if name == "vlm" else tiny_pipelines.PACKAGES)
        )
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = escape(f"{out}: {exc.strerror or exc}")
        console.print(f"[red]error:[/] cannot make the folder {reason}", highlight=False)
        return EXIT_CANNOT_WRITE
    for name in TINY_MODELS:
        if not _folder_or_nothing(out / name) and (args.force or not _present(out, name)):
            # A build renamed it away and deleted it (or, for a symbolic link, ended in a
            # traceback): refused before any model is built.
            reason = escape(f"{out / name}: is not a folder (a file, a pipe or a symbolic link)")
            console.print(
                f"[red]error:[/] {reason}; move it away, or name another OUT", highlight=False
            )
            return EXIT_CANNOT_WRITE
        foreign = [] if args.force or _present(out, name) else _not_written_here(out, name)
        if foreign:
            # A folder of the user's at a model's name was replaced, its files deleted.
            shown = ", ".join(str(path) for path in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            reason = escape(
                f"{out / name}: holds what this command does not write ({shown}{more}), so it "
                "is not a model it built"
            )
            console.print(
                f"[red]error:[/] {reason}; move it away or use --force to replace it",
                highlight=False,
            )
            return EXIT_CANNOT_WRITE
    _remove_abandoned_builds(out)
    for name in TINY_MODELS:
        folder = out / name
        if _present(out, name) and not args.force:
            console.print(f"{folder}: present", highlight=False, markup=False)
            continue
        building = out / f".{name}{_BUILDING}{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        try:
            if name == "vlm":
                build_tiny_vlm(building)
            else:
                build_tiny_pipeline(name, building)  # type: ignore[arg-type]
            _replace_folder(building, folder)
        except Exception as exc:
            disk = _as_os_error(exc)
            if disk is None:
                shutil.rmtree(building, ignore_errors=True)
                raise
            # A full disk or a folder that turned unwritable mid-build: the models built so
            # far are whole and stay; this one is not left half-written.
            shutil.rmtree(building, ignore_errors=True)
            console.print(f"[red]error:[/] {_cannot_write(folder, disk)}", highlight=False)
            return EXIT_CANNOT_WRITE
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        console.print(f"{folder}: built", highlight=False, markup=False)
    return 0


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _as_os_error(exc: Exception) -> OSError | None:
    """The system's error behind a failed save, or None for any other failure.

    safetensors reports a failed write (a full disk, ``ulimit -f``) as its own
    ``SafetensorError``, no OSError: ``Error while serializing: I/O error: No space left on
    device (os error 28)``; its reason is taken from the error number it names.
    """
    if isinstance(exc, OSError):
        return exc
    try:
        from safetensors import SafetensorError
    except ImportError:  # then no weights were written, and no write of them failed
        return None

    if not isinstance(exc, SafetensorError):
        return None
    found = _OS_ERROR.search(str(exc))
    if found is not None:
        number = int(found.group(1))
        return OSError(number, os.strerror(number))
    if "I/O error" in str(exc):
        return OSError(errno.EIO, str(exc))
    return None


def _cannot_write(folder: Path, exc: OSError) -> str:
    """The message for a model that could not be written (Rich markup, escaped)."""
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space on its disk, or name another OUT"
    elif exc.errno == errno.EFBIG:  # past the process's file-size limit (ulimit -f)
        advice = "raise the file-size limit (ulimit -f), or name another OUT"
    else:
        advice = "name an OUT this user can write"
    return escape(f"cannot write the model {folder}: {cause}") + f"; {advice}"


def _replace_folder(new: Path, folder: Path) -> None:
    """Put the folder ``new`` where ``folder`` is (a rename cannot replace a folder that
    holds files: the old one is moved aside first, then removed)."""
    old = folder.with_name(f".{folder.name}{_OLD}{os.getpid()}")
    had_one = folder.exists()
    if had_one:
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    new.rename(folder)
    if old.is_dir():
        shutil.rmtree(old)
    elif had_one:
        old.unlink()


def _present(out: Path, name: str) -> bool:
    return (out / name / WRITTEN_LAST[name]).is_file()


def _not_written_here(out: Path, name: str) -> list[Path]:
    """What the folder of model ``name`` holds that no build of it writes (sorted; none
    when the folder is not there, empty, or an earlier build's, cut short)."""
    folder = out / name
    if not folder.is_dir():
        return []
    foreign: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry)
        elif entry.is_dir():
            if entry.name not in LAYOUT[name]:
                foreign.append(entry)
                continue
            # A component's folder: its config, weights and tokenizer files only.
            for inner in sorted(entry.iterdir()):
                if inner.is_symlink() or not inner.is_file() or not _saved(inner):
                    foreign.append(inner)
        elif not (entry.is_file() and (_saved(entry) or entry.name in LAYOUT[name])):
            foreign.append(entry)
    return foreign


def _saved(file: Path) -> bool:
    return file.suffix in SAVED_SUFFIXES and not file.name.startswith(".")


def _folder_or_nothing(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def _remove_abandoned_builds(out: Path) -> None:
    # The hidden folders of builds whose process is gone (killed mid-build, where nothing
    # could remove them); a build still running in another process is left alone. Only
    # the names this command gives them, of its own models: any `.X.old-<digits>` matched,
    # a user's `.thesis.old-20240131` deleted with its files (a date is no running pid).
    prefixes = tuple(f".{name}{mark}" for name in TINY_MODELS for mark in (_BUILDING, _OLD))
    for leftover in sorted(out.iterdir()):
        prefix = next((p for p in prefixes if leftover.name.startswith(p)), None)
        if prefix is None or leftover.is_symlink() or not leftover.is_dir():
            continue
        pid = leftover.name.removeprefix(prefix)
        if pid.isascii() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True
