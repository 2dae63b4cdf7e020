"""The field types of the config model and of its backends' options, each with its check.

Names that become folders, generator names, ``http(s)://`` URLs, environment variable names
(an API key's ``api_key_env``), paths, tasks and pairs: a value that fails is refused with a
message naming what is wrong, and values that may hold a secret (a URL, a pasted key) are
never quoted. :data:`OPTIONS_CONFIG` is how every config table, a backend's options
included, is read.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Final
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from trig_stream.config_problems import UNQUOTED_PROBLEM
from trig_stream.dimensions import Task, normalise_task, split_pair
from trig_stream.records import COMPARISON_FILE, is_reserved_model_name, safe_name_problem


def _safe_name(value: str) -> str:
    # The run's own check (and its data_ids'): a name it would refuse must not pass here.
    problem = safe_name_problem(value)
    if problem is not None:
        raise ValueError(f"{problem} (it becomes a folder name)")
    return value


def _model_name(value: str) -> str:
    if is_reserved_model_name(value):
        raise ValueError(
            f"is the name of the report's comparison of the models ({COMPARISON_FILE}, beside "
            "their folders): give the model another name"
        )
    return value


def _served_model(value: str) -> str:
    # Each of these validated and went out in every request, which the server answered 404
    # (no such model) for every image; the manifest recorded the name as it was. The config
    # message quotes the value itself.
    if not value.strip():
        raise ValueError(
            "is empty or blank: give the model's name as the server serves it (for vLLM, "
            "its --served-model-name or the model's path)"
        )
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ValueError(
            "holds a control character (a line break, a tab): write the model's name on one "
            "line, as the server serves it"
        )
    if value != value.strip():
        raise ValueError(
            "starts or ends with a space: write the model's name without it, as the server "
            "serves it"
        )
    return value


def _pair(value: str) -> str:
    split_pair(value)
    return value


_INVISIBLE = frozenset(
    "\u00ad\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
)
"""The format characters a URL never means to hold: the soft hyphen, the zero-width space,
the word joiner and invisible operators, the BOM and the direction marks and controls. Not
every format character: the zero-width non-joiner and joiner (U+200C, U+200D) spell words
of Persian and Indic scripts."""


def _http_url(value: str) -> str:
    # Checked here, so that a typo is a config error naming its key, not a traceback or a
    # run whose every request fails. The URL itself is never quoted: it may hold a password
    # or, in a query, a key.
    if any(char.isspace() for char in value):
        raise _unquoted_problem("holds spaces: write the URL without them (in a path, %20)")
    if any(unicodedata.category(char) == "Cc" or char in _INVISIBLE for char in value):
        # Sent percent-encoded, to a path no server has, and invisible where the config is
        # read.
        raise _unquoted_problem(
            "holds an invisible character (a zero-width space, a direction mark, a control "
            "character): write the URL again without it"
        )
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - reading it checks it (out of range, not a number)
    except ValueError as exc:
        raise _unquoted_problem(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _unquoted_problem("not an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise _unquoted_problem(
            "holds credentials (user:password@): remove them, and put the API key in the "
            "environment variable that api_key_env names (the config is saved with the run)"
        )
    if "?" in value or "#" in value:
        # Each client appends the API's path to the base URL, which lands inside the query.
        raise _unquoted_problem(
            "holds a query string or fragment (?..., #...), which no request would carry as "
            "written: give the base URL without it"
        )
    try:
        ascii_host(parts.hostname)
    except ValueError as exc:
        raise _unquoted_problem(str(exc)) from None
    return value


def ascii_host(host: str) -> str:
    """``host`` as a request writes it: a name in another script in its IDNA form
    (``vé.example`` -> ``xn--v-bga.example``), as aiohttp and httpx (the SDK's) write it.

    Raises:
        ValueError: the host is a name that IDNA cannot write.
    """
    if host.isascii():
        return host
    # Installed with aiohttp and with httpx, which encode hosts with it. Strict IDNA 2008,
    # as httpx does: aiohttp maps some more (full-width letters), which httpx refuses.
    import idna

    try:
        return idna.encode(host.lower()).decode("ascii")
    except idna.IDNAError:
        raise ValueError(
            "names a host IDNA cannot write (a character no domain name holds): write the host "
            "in ASCII, or in its xn-- form"
        ) from None


def _unquoted_problem(message: str) -> PydanticCustomError:
    return PydanticCustomError(UNQUOTED_PROBLEM, message)


_VARIABLE_NAME: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
NOT_A_VARIABLE: Final = (
    "not the name of an environment variable (letters, digits and '_', not starting with a "
    "digit): if it is the API key itself, take it out (it would be printed and saved), export "
    "it in a variable and give the variable's name instead, e.g. OPENAI_API_KEY"
)
"""What is wrong with an API key's variable name that is none, without quoting it."""


def is_variable_name(text: str) -> bool:
    """Whether ``text`` can name an environment variable (``OPENAI_API_KEY``)."""
    return bool(_VARIABLE_NAME.match(text))


def _variable_name(value: str) -> str:
    # An API key pasted where its variable's name goes would be printed by every message
    # that names the variable, and saved with the run: refused here, and never quoted.
    if value and not is_variable_name(value):
        raise _unquoted_problem(NOT_A_VARIABLE)
    return value


EMPTY_PATH: Final = (
    "the path is empty (which would mean the config's own folder): name the file or folder"
)


def _non_empty_path(value: object) -> object:
    # Path("") is ".", the config's own folder, which no one means by writing "".
    if value == "":
        raise ValueError(EMPTY_PATH)
    return value


_DEVICE: Final = re.compile(r"\A(cpu|cuda(:[0-9]+)?|mps(:0)?)\Z")


def _device_name(value: str) -> str:
    # One rule for a generator's devices and a judge's device: "cpu:1" passed for one and
    # was refused for the other with the raw pattern. It means nothing beyond "cpu"; "mps:0"
    # is torch's name of the one MPS device, as "cuda:0" is of the first CUDA one. Digits are
    # ASCII: \d let "cuda:\u0663" through.
    if not _DEVICE.match(value):
        raise ValueError(
            "unknown device; use 'cpu', 'cuda', 'cuda:<n>', 'mps' or 'mps:0' (torch's names)"
        )
    return value


ConfigPath = Annotated[Path, BeforeValidator(_non_empty_path)]
"""A path in the config: never empty."""
SafeName = Annotated[str, AfterValidator(_safe_name)]
ModelName = Annotated[SafeName, AfterValidator(_model_name)]
"""A generator's name: a safe name that is not one of the report's files."""
ServedModel = Annotated[str, AfterValidator(_served_model)]
"""A model's name on an OpenAI-protocol server (a request's ``model``): not empty, without
control characters or spaces around it."""
HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""An ``http://`` or ``https://`` URL with a host, and a valid port if it names one; without
spaces, credentials, query string or fragment."""
EnvVarName = Annotated[str, AfterValidator(_variable_name)]
"""The name of an environment variable (an API key's ``api_key_env``), or ``""`` for none; a
value that is not one (the key itself, pasted) is refused without being quoted."""
TaskName = Annotated[
    Task, BeforeValidator(lambda v: normalise_task(v) if isinstance(v, str) else v)
]
PairName = Annotated[str, AfterValidator(_pair)]
DeviceName = Annotated[str, AfterValidator(_device_name)]
"""A torch device a model can go to: ``cpu``, ``cuda``, ``cuda:<n>``, ``mps`` or ``mps:0``
(whether it exists is checked where torch is imported)."""
Backoff = Annotated[float, Field(ge=0, le=3600)]
"""Seconds a retry waits (a backoff's start or ceiling): at most an hour, a longer one being a
mistake that would hold a request, and a graceful stop, that long."""
CallTimeout = Annotated[float, Field(gt=0, le=86400)]
"""Seconds one API call may take in all: at most a day. A far larger one (``1e10``) is past
what the clients' clocks can hold, and every call failed with OverflowError."""


OPTIONS_CONFIG: Final = ConfigDict(
    extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=True
)
"""How config tables are read: unknown keys refused, and no NaN or infinity where a number
goes (TOML has both; a request would send them as non-standard JSON, the manifest as null).
A refused value is left out of the error's text (options built in Python may hold a secret,
as a URL's password); config messages quote it themselves where safe."""


def set_by_the_engine(option: str, taken: Sequence[str], reasons: Mapping[str, str]) -> str | None:
    """Why a backend's ``option`` table cannot be used: it sets ``taken``, keys the engine
    sets itself (each with its reason in ``reasons``); None if it sets none."""
    if not taken:
        return None
    why = "; ".join(f"{key}: {reasons[key]}" for key in taken)
    return (
        f"{option.rpartition('.')[2]} sets {', '.join(taken)}, which the engine sets itself "
        f"({why}); remove {'it' if len(taken) == 1 else 'them'} from {option}"
    )
