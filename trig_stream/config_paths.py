"""The paths of a run config, resolved as :func:`~trig_stream.config.load_config` resolves them.

A path starting with ``~`` starts in the home folder; a relative one starts in the config's
own folder, and so does a ``serve`` table's program written as a path (``../bin/vllm``;
``vllm`` alone is looked up on PATH). A path that looks like an environment variable
(``$HOME/runs``: none is expanded), names the home folder of an unknown user, or is no UTF-8
text once resolved is refused, naming its key; so is a ``dtm_rewrite`` generator's ``report``
inside the run's own run directory. Backends' options are resolved by their keys
(:data:`PATH_OPTIONS`, :data:`HUB_OR_PATH_OPTIONS`); the tables passed through to a library
are left alone.
"""

from __future__ import annotations

import os
import re
from contextlib import suppress
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from trig_stream.config_fields import EMPTY_PATH
from trig_stream.config_problems import Loc, dotted_key
from trig_stream.errors import ConfigError
from trig_stream.files import locale_problem, locale_refusal, real_path

if TYPE_CHECKING:
    from trig_stream.config import GeneratorConfig


PATH_OPTIONS = frozenset({"path", "report", "template", "model_path"})
"""Backend options that name a file or folder, resolved like the config's own paths."""
HUB_OR_PATH_OPTIONS = frozenset({"checkpoint"})
"""Options that hold a hub id (``org/model``) or a folder: resolved only when written as an
explicit relative path (``./x``, ``../x``) or from the home folder (``~/x``)."""
PASSED_THROUGH_OPTIONS = frozenset({"call", "load", "extra_body"})
"""Tables handed as they are to a library or an API (a pipeline's call and loading
arguments, an images API's extra body): their keys are not ours, so nothing in them is
resolved. Other nested tables are backends' options (a wrapper's inner generator, a metric)."""


class PathProblem(ConfigError):
    """A path of a config that cannot be resolved, and where it is:
    :func:`~trig_stream.config.parse_config` names its line; as raised by
    :meth:`~trig_stream.config.RunConfig.resolve_paths`, its message names the key."""

    def __init__(self, loc: Loc, why: str) -> None:
        super().__init__(f"{dotted_key(loc)}: {why}")
        self.loc = loc
        self.why = why


class PathProblems(ConfigError):
    """Every path of a config that cannot be resolved (see :class:`PathProblem`)."""

    def __init__(self, problems: list[PathProblem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


def path_problems(data: Any, base: Path) -> list[PathProblem]:
    """The paths of the config mapping ``data`` that cannot be resolved from ``base``, as
    :meth:`~trig_stream.config.RunConfig.resolve_paths` resolves them: found in its tables as
    written, so that they are listed with the config's other problems, which leave no model
    to resolve."""
    problems: list[PathProblem] = []
    _resolve_tables(data, base, problems, None)
    return problems


def resolved_paths(data: Any, base: Path) -> dict[Loc, Path]:
    """The paths of the config mapping ``data`` resolved from ``base`` as
    :meth:`~trig_stream.config.RunConfig.resolve_paths` resolves them, by where they are
    (those that cannot be resolved left out; a hub id is no path)."""
    found: dict[Loc, Path] = {}
    _resolve_tables(data, base, [], found)
    return found


def _resolve_tables(
    data: Any, base: Path, problems: list[PathProblem], found: dict[Loc, Path] | None
) -> None:
    if not isinstance(data, dict):
        return
    for loc in (("run", "output_dir"), ("dataset", "path"), ("dataset", "image_root")):
        table = data.get(loc[0])
        value = table.get(loc[1]) if isinstance(table, dict) else None
        if isinstance(value, str | PurePath) and str(value):  # an empty one is the model's
            resolve_noting(Path(value), base, loc, problems, found=found)
    for kind in ("generators", "judges"):
        entries = data.get(kind)
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            options = entry.get("options") if isinstance(entry, dict) else None
            if isinstance(options, dict):
                resolve_options(options, base, (kind, index, "options"), problems, found=found)


_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
"""A shell's ``$NAME``: what it would expand, when ``NAME`` is set."""
_BRACED = re.compile(r"\$\{[^}]*\}?")
"""A shell's ``${...}``."""


def _refuse_variables(path: Path, loc: Loc, base: Path) -> None:
    # ``$HOME/runs`` became a folder literally named "$HOME" beside the config, which a later
    # `rm -rf $HOME/runs` in a shell would not remove, or worse. Refused, set here or not: a
    # part that starts with ``$NAME`` (``$SCRATCH/runs``: unset in cron or CI, it is still
    # meant as a variable, and the same config is refused in a shell that sets it) and any
    # ``${``, a shell's syntax no file name is likely to use; unless the path up to that part
    # exists as written (Windows' ``$RECYCLE.BIN``). A ``$NAME`` inside a name
    # (``runs-$USER``, ``a$b``) is refused only when ``NAME`` is set: a shell would expand it.
    parts = path.parts
    for index, part in enumerate(parts):
        braced = _BRACED.search(part)
        leading = _VARIABLE.match(part)
        named = next((m for m in _VARIABLE.finditer(part) if m.group(1) in os.environ), None)
        if braced is not None:
            found = braced.group()
        elif leading is not None:
            found = leading.group()
        elif named is not None:
            found = named.group()
        else:
            continue
        if (braced is not None or leading is not None) and _exists_as_written(
            Path(*parts[: index + 1]), base
        ):
            continue
        if braced is None and leading is None and named is not None:
            how = f"; a name that really holds {found}: rename it, or unset {named.group(1)}"
        else:
            how = f"; a folder really named {part!r} is taken as written once it exists"
        raise PathProblem(
            loc,
            f"{path}: {part!r} looks like an environment variable ({found}), and a config's "
            "paths are taken as written (no variable is expanded): write the path out in full "
            f"(a leading ~ is the home folder){how}",
        )


def _exists_as_written(path: Path, base: Path) -> bool:
    """Whether ``path`` (relative ones from ``base``; ``~`` the home folder) names something
    on disk, taken literally."""
    try:
        if str(path).startswith("~"):
            path = path.expanduser()
        return os.path.lexists(path if path.is_absolute() else base / path)
    except (RuntimeError, OSError, ValueError):  # no home folder known; a name too long
        return False


def _resolve(path: Path, base: Path, loc: Loc) -> Path:
    _refuse_variables(path, loc, base)
    # ``~`` as a shell reads it: a folder literally named "~" beside the config, which a
    # later `rm -rf ~` would take for the home folder, is never what was meant.
    if str(path).startswith("~"):
        try:
            path = path.expanduser()
        except RuntimeError:  # ~name of an unknown user, or no home folder at all
            raise PathProblem(
                loc,
                f"{path}: no home folder is known for {path.parts[0]}: write the path out in full",
            ) from None
    unusable = locale_problem(path if path.is_absolute() else base / path)
    if unusable is not None:
        raise PathProblem(loc, unusable)
    resolved = path if path.is_absolute() else real_path(base / path)
    try:
        str(resolved).encode("utf-8")
    except UnicodeEncodeError:
        with suppress(UnicodeDecodeError):
            os.fsencode(resolved).decode("utf-8")
            # UTF-8 bytes, read as surrogates: a file-name encoding that is not UTF-8.
            raise PathProblem(loc, locale_refusal(resolved)) from None
        # A folder named in another encoding (``caf\xe9``, Latin-1): Python holds its bytes
        # as half characters, which the run directory's manifest, written as UTF-8 JSON,
        # cannot record; the run crashed after taking its directory.
        shown = os.fsencode(resolved).decode("utf-8", "backslashreplace")
        raise PathProblem(
            loc,
            f"{shown}: the path is not UTF-8 text (a folder named in another "
            "encoding), and a run records its paths as UTF-8: rename that folder, or move "
            "the config and its files under a UTF-8 path",
        ) from None
    return resolved


def resolve_noting(
    path: Path,
    base: Path,
    loc: Loc,
    problems: list[PathProblem],
    *,
    found: dict[Loc, Path] | None = None,
) -> Path:
    """``path`` resolved; as written, its problem added to ``problems``, when it has one.
    Resolved, it is also put in ``found`` at ``loc``, when given."""
    try:
        resolved = _resolve(path, base, loc)
        if found is not None:
            found[loc] = resolved
        return resolved
    except PathProblem as exc:
        problems.append(exc)
    except ValueError:  # a NUL ("embedded null byte"), refused with the text that holds it
        pass
    return path


def refuse_reports_in(run_dir: Path, generators: list[GeneratorConfig]) -> None:
    """Refuse a ``dtm_rewrite`` generator's ``report`` (resolved) inside ``run_dir``.

    The run writes its report again at its end, that file included: the relations read from
    it, and with them the generator's fingerprint, changed, and the run directory refused
    the run's own next command (exit 3). Checked against the configured run directory with
    or without ``--new-run``: the new folder that flag picks beside it holds no file yet (and
    is the configured one when it is resumed, by its ``[run] name``), while a report in the
    configured one is written again by the next run of this config without the flag.
    """
    own = Path(os.path.realpath(run_dir))
    for index, generator in enumerate(generators):
        report = generator.options.get("report")
        if generator.backend != "dtm_rewrite" or not isinstance(report, str):
            continue
        if Path(os.path.realpath(report)).is_relative_to(own):
            raise PathProblem(
                ("generators", index, "options", "report"),
                f"{report}: lies in this run's own run directory ({run_dir}), whose report "
                "the run writes again at its end: the relations read from it would change, "
                "and the run directory would then refuse the run's next command (exit 3) as "
                "made with other settings; copy the file out of the run directory (next to "
                "the config, say) and point report at the copy",
            )


def _program_path(command: Any) -> bool:
    """Whether ``command`` (a ``serve`` table's) starts with a relative path to its program
    (``./vllm``, ``../bin/vllm``, ``~/bin/vllm``), which starts in the config's folder like
    its other paths; a bare name (``vllm``) is looked up on PATH, as a shell looks it up."""
    if not isinstance(command, list) or not command or not isinstance(command[0], str):
        return False
    return "/" in command[0] and not Path(command[0]).is_absolute()


def _resolve_program(
    program: Path, base: Path, loc: Loc, problems: list[PathProblem], found: dict[Loc, Path] | None
) -> Path:
    """``program`` (see :func:`_program_path`) with its folder resolved and its own name kept:
    a link there (a virtual environment's ``python``) is what runs, as a shell runs it."""
    before = len(problems)
    resolve_noting(program, base, loc, problems)  # a problem names the program, not its folder
    if len(problems) > before:
        return program
    return resolve_noting(program.parent, base, loc, problems, found=found) / program.name


def resolve_options(
    options: dict[str, Any],
    base: Path,
    where: Loc,
    problems: list[PathProblem],
    *,
    found: dict[Loc, Path] | None = None,
) -> dict[str, Any]:
    """``options`` with their paths resolved; the problem of each that has one added to
    ``problems`` (that path left as written); each resolved from ``base`` put in ``found``,
    when given."""
    resolved = dict(options)
    for key, value in options.items():
        loc = (*where, key)
        if key in PASSED_THROUGH_OPTIONS:
            continue
        if isinstance(value, dict):  # nested backends (e.g. the inner generator of a wrapper)
            resolved[key] = resolve_options(value, base, loc, problems, found=found)
        elif key == "command" and where[-1:] == ("serve",) and _program_path(value):
            program = _resolve_program(Path(value[0]), base, (*loc, 0), problems, found)
            resolved[key] = [str(program), *value[1:]]
        elif isinstance(value, PurePath) and key in PATH_OPTIONS | HUB_OR_PATH_OPTIONS:
            # A code-built config's Path("imgs"): a path, never a hub id, resolved as its
            # text would be (its "./" is gone by now) and handed on as text.
            resolved[key] = str(resolve_noting(Path(value), base, loc, problems, found=found))
        elif not isinstance(value, str):
            continue
        elif Path(value).is_absolute():
            if key in PATH_OPTIONS:  # left as written, but never with a variable unexpanded
                try:
                    _refuse_variables(Path(value), loc, base)
                except PathProblem as exc:
                    problems.append(exc)
            continue
        elif not value and key in PATH_OPTIONS | HUB_OR_PATH_OPTIONS:
            problems.append(PathProblem(loc, EMPTY_PATH))
        elif key in PATH_OPTIONS or (key in HUB_OR_PATH_OPTIONS and value.startswith((".", "~"))):
            resolved[key] = str(resolve_noting(Path(value), base, loc, problems, found=found))
    return resolved
