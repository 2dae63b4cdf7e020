"""The ``make-tiny-models`` command: random-weight models for the CPU demo and for trying
configs offline.

It writes, under one folder, a tiny Flux and a tiny Stable Diffusion pipeline (t2i), a tiny
InstructPix2Pix pipeline (p2p) and a tiny LLaVA judge, each loadable with
``from_pretrained(folder, local_files_only=True)`` like a real checkpoint. Their weights are
random: images are noise and scores mean nothing; they exercise the real loading and
inference code without a download or a GPU.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

TINY_MODELS = ("flux", "sd", "instruct_pix2pix", "vlm")


EXIT_CANNOT_WRITE = 3
"""The output folder cannot be made (as the CLI's exit code for an unusable run directory)."""


def add_tiny_models_command(subparsers: Any) -> None:
    """Add ``make-tiny-models OUT`` to the ``trig-stream`` command."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "make-tiny-models",
        help="build random-weight tiny pipelines and a tiny VLM judge (for the CPU demo)",
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to write them into")
    parser.add_argument(
        "--force", action="store_true", help="build again even when a model folder exists"
    )
    parser.set_defaults(handler=make_tiny_models)


def make_tiny_models(args: argparse.Namespace, console: Console) -> int:
    """Build every tiny model missing under ``args.out``.

    Returns:
        0, or 3 when ``args.out`` cannot hold them (a file, or a folder it cannot write).
    """
    from trig_stream.cli import QUIET_LIBRARIES

    # As `run`: no progress bars or advice from the model libraries (read as they import).
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    from trig_stream.testing.tiny_pipelines import build_tiny_pipeline
    from trig_stream.testing.tiny_vlm import build_tiny_vlm

    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = escape(f"{out}: {exc.strerror or exc}")
        console.print(f"[red]error:[/] cannot make the folder {reason}", highlight=False)
        return EXIT_CANNOT_WRITE
    for name in TINY_MODELS:
        folder = out / name
        if folder.is_dir() and any(folder.iterdir()) and not args.force:
            console.print(f"{folder}: present", highlight=False, markup=False)
            continue
        if name == "vlm":
            build_tiny_vlm(folder)
        else:
            build_tiny_pipeline(name, folder)  # type: ignore[arg-type]
        console.print(f"{folder}: built", highlight=False, markup=False)
    return 0
