"""The ``simulate-judge`` command: serve the loopback judge until interrupted.

Point a run's ``openai`` judge at it to try the whole pipeline, faults included, without a
GPU::

    trig-stream simulate-judge --port 8000 --latency 0.05 --capacity 64 --error-rate 0.01
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from rich.console import Console
from rich.markup import escape

from trig_stream.config_fields import NOT_A_VARIABLE, is_variable_name
from trig_stream.dimensions import DIMENSIONS, split_pair
from trig_stream.path_arguments import path_argument
from trig_stream.records import printable
from trig_stream.signals import point_at_devnull, stop_signals
from trig_stream.testing.judge_options import DEFAULT_MODEL, JudgeServerOptions
from trig_stream.testing.judge_server import JudgeServer
from trig_stream.testing.planted_scores import loadings

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 4
"""The address cannot be listened on (as the CLI's exit code for a fatal error)."""


def add_simulate_judge_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``simulate-judge`` to the ``trig-stream`` command's subparsers.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.

    Returns:
        The command's parser (its handler is set as the ``handler`` default).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate-judge",
        help="serve a simulated OpenAI-protocol judge (logprobs, faults) on loopback",
        description=(
            "Serve POST /v1/chat/completions with rating logprobs, plus /v1/models, /health, "
            "/metrics (vLLM gauge names) and /stats, until interrupted."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--model",
        help="the model name to serve; given, a request naming another model is answered 404, "
        "and one naming none is served, as vLLM answers (default: trig-judge-sim, and any "
        "model name is accepted)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--capacity", type=int, default=64, help="requests processed at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--error-rate", type=float, default=0.0, help="share answered 503")
    parser.add_argument("--rate-limit-rate", type=float, default=0.0, help="share answered 429")
    parser.add_argument(
        "--retry-after", default="1", help="Retry-After of 429s: seconds or an HTTP date"
    )
    parser.add_argument("--hang-rate", type=float, default=0.0, help="share never answered")
    parser.add_argument(
        "--malformed-rate", type=float, default=0.0, help="share answered with broken JSON"
    )
    parser.add_argument(
        "--missing-logprobs-rate", type=float, default=0.0, help="share answered without logprobs"
    )
    parser.add_argument(
        "--reset-rate", type=float, default=0.0, help="share whose connection is aborted"
    )
    parser.add_argument(
        "--correlation",
        action="append",
        default=[],
        metavar="A_B=R",
        help="plant correlation R between two dimensions, e.g. IQ-R_TA-C=0.8 (repeatable)",
    )
    parser.add_argument("--api-key-env", help="require the key held in this environment variable")
    parser.add_argument(
        "--allowed-local-media-path",
        type=path_argument,
        metavar="FOLDER",
        help="accept file:// image URLs of files in this folder (as vLLM's option; without "
        "it they are refused, as vLLM refuses them)",
    )
    parser.set_defaults(handler=run_simulate_judge)
    return parser


def options_from_args(args: argparse.Namespace) -> JudgeServerOptions:
    """The server options the command line asks for.

    Raises:
        ValueError: a ``--correlation`` is not ``A_B=R`` or names a pair twice, or an option
            is out of range.
    """
    correlations: dict[str, float] = {}
    for text in args.correlation:
        pair, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"--correlation {text!r}: expected A_B=R, e.g. IQ-R_TA-C=0.8")
        pair = pair.strip()
        if not pair:
            raise ValueError(f"--correlation {text!r}: no pair before '='; expected A_B=R")
        try:
            planted = float(value)
        except ValueError:
            raise ValueError(
                f"--correlation {text!r}: {value.strip()!r} is not a number; expected A_B=R "
                "with R from -1 to 1, e.g. IQ-R_TA-C=0.8"
            ) from None
        try:  # checked here, where the option typed is known: the model names no option
            loadings({pair: planted})
        except ValueError as exc:
            raise ValueError(f"--correlation {text!r}: {exc}") from None
        # A correlation is symmetric: TA-C_IQ-R is the pair IQ-R_TA-C, in canonical order.
        first, second = sorted(split_pair(pair), key=DIMENSIONS.index)
        pair = f"{first}_{second}"
        if pair in correlations:
            raise ValueError(
                f"--correlation {text!r}: the pair {pair} is given twice (in either order); "
                "give each pair once"
            )
        correlations[pair] = planted
    try:  # a dimension in two planted pairs: a rule over several --correlation
        loadings(correlations)
    except ValueError as exc:
        raise ValueError(f"--correlation: {exc}") from None
    media: Path | None = args.allowed_local_media_path
    if media is not None and not media.is_dir():
        # vLLM refuses such a folder at start; accepted here, every file:// image was
        # refused later, one request at a time.
        problem = "is not a folder" if media.exists() else "no such folder"
        raise ValueError(
            f"--allowed-local-media-path {media}: {problem}; name the folder the judged "
            "images lie in (a run's images are in <run dir>/images)"
        )
    if args.api_key_env and not is_variable_name(args.api_key_env):
        raise ValueError(f"--api-key-env: {NOT_A_VARIABLE}")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise ValueError(f"--api-key-env: the environment variable {args.api_key_env} is not set")
    if args.model is not None and not args.model.strip():
        # It served the default name, with other names answered 404.
        raise ValueError(
            "--model: empty; name the model to serve (e.g. trig-judge-sim), or leave --model "
            "out to accept any name"
        )
    try:
        return JudgeServerOptions(
            model=args.model or DEFAULT_MODEL,
            served_model_only=args.model is not None,
            latency_s=args.latency,
            capacity=args.capacity,
            seed=args.seed,
            error_rate=args.error_rate,
            rate_limit_rate=args.rate_limit_rate,
            retry_after=args.retry_after,
            hang_rate=args.hang_rate,
            malformed_rate=args.malformed_rate,
            missing_logprobs_rate=args.missing_logprobs_rate,
            reset_rate=args.reset_rate,
            correlations=correlations,
            api_key=api_key,
            allowed_local_media_path=args.allowed_local_media_path,
        )
    except ValidationError as exc:
        problems = "; ".join(_problem(e, args) for e in exc.errors())
        raise ValueError(problems) from None


def _problem(error: ErrorDetails, args: argparse.Namespace) -> str:
    """One option's problem, named as typed, in the model's words without pydantic's
    ``Value error, `` prefix."""
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"]:
        return f"{_option_of(error['loc'])}: {message}"
    # The model's own rule: once the correlations are checked above, only the fault rates'
    # sum is one, and the options it is over are the rates given.
    rates = [
        _option_of((field,))
        for field in JudgeServerOptions.model_fields
        if field.endswith("_rate") and vars(args).get(field)
    ]
    return f"{', '.join(rates) or 'fault rates'}: {message}"


_OPTIONS = {"latency_s": "--latency", "correlations": "--correlation", "api_key": "--api-key-env"}
"""The options whose field of :class:`JudgeServerOptions` is named otherwise."""


def _option_of(loc: tuple[int | str, ...]) -> str:
    """The option typed, for the field an error names (``latency_s``: ``--latency``)."""
    if not loc:
        return ""
    field = str(loc[0])
    option = _OPTIONS.get(field, "--" + field.replace("_", "-"))
    return " ".join([option, *map(str, loc[1:])])


def run_simulate_judge(args: argparse.Namespace, console: Console) -> int:
    """Handler of ``simulate-judge``: serve until SIGINT or SIGTERM."""
    try:
        options = options_from_args(args)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port {args.port}: a port is 0 to 65535 (0 picks a free one)")
        if not args.host.strip():  # it served, but at http://:PORT/v1, no URL a client takes
            raise ValueError("--host: empty; name the address to listen on (127.0.0.1)")
    except ValueError as exc:
        console.print(f"[red]error:[/] {escape(printable(str(exc)))}", highlight=False)
        return EXIT_USAGE
    failed = anyio.run(_serve, options, args.host, args.port, console, backend="asyncio")
    if failed is not None:  # the address is taken, or not this machine's
        # asyncio's text repeats the address; a lookup failure has a negative errno.
        reason = os.strerror(failed.errno) if failed.errno and failed.errno > 0 else None
        reason = reason or failed.strerror or str(failed)
        where = printable(f"{args.host}:{args.port}: {reason}")
        console.print(f"[red]error:[/] cannot listen on {escape(where)}", highlight=False)
        return EXIT_UNAVAILABLE
    return EXIT_OK


async def _serve(
    options: JudgeServerOptions, host: str, port: int, console: Console
) -> OSError | None:
    """Serve until SIGTERM, or SIGINT or SIGHUP unless ignored; return the error that kept it
    from listening, if one did (any other error is no listening problem, and is raised)."""
    async with AsyncExitStack() as stack:
        try:
            server = await stack.enter_async_context(JudgeServer(options, host=host, port=port))
        except OSError as exc:
            return exc
        except UnicodeError:  # a name no lookup takes ("..", a label over 63 characters)
            return OSError("not a valid host name")
        console.print(
            f"simulated judge serving {options.model!r} at {server.base_url}",
            highlight=False,
            markup=False,
        )
        # The stop signals are taken before READY, so a tool that stops the server on
        # reading it stops it as any other stop does; one the command was started ignoring
        # (SIGINT in a script's background job) stays ignored, as in every command, except
        # SIGTERM: a server has no terminal to respect, a SIGTERM is sent on purpose, and
        # with all three ignored only SIGKILL stopped it (without its counts).
        stop = dict.fromkeys([*stop_signals(), signal.SIGTERM])
        with anyio.open_signal_receiver(*stop) as signals:
            # Tools that start the command read this line to learn the port.
            try:
                print(f"READY {server.base_url}", flush=True)
            except BrokenPipeError:  # nobody reads it (`| true`): serve all the same
                point_at_devnull([sys.stdout.fileno()])
            async for _ in signals:
                break
        stats = server.stats()
        console.print(
            f"stopped: {stats.served} served, {stats.repeated} repeated, "
            f"{sum(stats.faults.values())} faults"
        )
    return None
