"""The ``trig-stream import-config`` command: convert an upstream YAML file, print or write it.

The conversion itself is :func:`~trig_stream.upstream_config.convert.import_config`; this
module adds the command's arguments to ``trig-stream`` and shows its warnings on the terminal.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from trig_stream.errors import ConfigError, ConfigWriteError
from trig_stream.files import write_atomic
from trig_stream.path_arguments import path_argument
from trig_stream.records import printable
from trig_stream.terminal import write_stdout
from trig_stream.upstream_config.convert import import_config

EXIT_OK = 0


def add_import_config_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``import-config`` to the ``trig-stream`` command's subparsers.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.

    Returns:
        The command's parser (its handler is set as the ``handler`` default).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "import-config",
        help="convert a TRIG upstream YAML config into a trig-stream TOML config",
        description=(
            "Convert a TRIG upstream YAML config (models, image_dirs, trig_api judges, "
            "dataset, relation thresholds) into a trig-stream TOML config. Every upstream key "
            "left out is named in a warning and in a comment at the top of the TOML."
        ),
    )
    parser.add_argument("yaml", type=path_argument, metavar="UPSTREAM_YAML")
    parser.add_argument(
        "-o", "--out", type=path_argument, help="write the TOML here (default: standard output)"
    )
    parser.add_argument(
        "--root",
        type=path_argument,
        help="the folder upstream's relative paths start from, its project root "
        "(default: the current folder)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.set_defaults(handler=run_import_config)
    return parser


def run_import_config(args: argparse.Namespace, console: Console) -> int:
    """Handle ``trig-stream import-config``.

    Raises:
        ConfigError: unreadable or unconvertible input, or an output file that exists.
        ConfigWriteError: the config cannot be written (to ``-o`` or standard output).
    """
    out: Path | None = args.out
    target = None if out is None else _file_to_write(out, args.yaml, force=args.force)
    conversion = import_config(args.yaml, out=out, root=args.root)
    for line in conversion.warnings:
        console.print(f"[yellow]warning:[/] {escape(printable(line))}", highlight=False)
    try:
        data = conversion.text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a path of --root's that is not UTF-8
        raise ConfigError(
            f"{args.yaml}: the converted config cannot be written as UTF-8 text: "
            f"{conversion.text[exc.start : exc.end]!r} (a file name that is not UTF-8?)"
        ) from None
    if out is None or target is None:
        try:
            write_stdout(conversion.text)
        except OSError as exc:  # a full disk under `> out.toml`: the config is not written
            raise ConfigWriteError(
                f"standard output: cannot write the config: {exc.strerror or exc}; pass -o "
                "FILE to write it to a file"
            ) from None
    else:
        try:
            # Whole or not at all: a failed write left an empty file, which the next try
            # then refused to overwrite without --force.
            write_atomic(target, data)
        except (FileExistsError, NotADirectoryError):
            raise ConfigWriteError(
                f"{out}: cannot write the config: a file stands where a folder of its path "
                "should be"
            ) from None
        except OSError as exc:
            raise ConfigWriteError(
                f"{out}: cannot write the config: {exc.strerror or exc}"
            ) from None
        through = f" (a symbolic link to {target})" if out.is_symlink() else ""
        console.print(
            f"wrote {escape(f'{out}{through}')}: {len(conversion.config.generators)} model(s), "
            f"{len(conversion.config.judges)} judge(s), {len(conversion.warnings)} warning(s)",
            highlight=False,
        )
    return EXIT_OK


def _file_to_write(out: Path, source: Path, *, force: bool) -> Path:
    """The file that ``-o out`` names: ``out`` itself, or the file a symbolic link there
    points to (replaced, the link kept).

    Only a regular file is replaced, and only with ``--force``: the write renames a new file
    over the old one, so a pipe or a device there would have become a plain file.

    Raises:
        ConfigError: ``out`` is a folder, a pipe, a device or a link that leads nowhere
            usable; it is the upstream config itself; or it exists and ``force`` is off.
    """
    # realpath follows every link, a dangling one's included (to the missing file it names);
    # a loop of links leaves a link, refused below as no regular file.
    target = Path(os.path.realpath(out))
    linked = f" (a symbolic link to {target})" if out.is_symlink() else ""
    try:
        mode = os.lstat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return target  # not there (the write names a file standing for a folder)
    except OSError as exc:
        raise ConfigError(f"{out}{linked}: cannot look at it: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{out}{linked}: is a folder; -o names the TOML file to write")
    if not stat.S_ISREG(mode):
        raise ConfigError(
            f"{out}{linked}: is not a regular file (a pipe, a device or a loop of links?); "
            "-o names the TOML file to write, or leave -o out to print the config"
        )
    if _same_file(target, source):
        raise ConfigError(
            f"{out}{linked}: is the upstream config being converted; name another file with -o"
        )
    if not force:
        raise ConfigError(f"{out}{linked}: exists; pass --force to overwrite it")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # the upstream config is unreadable: its conversion says so
