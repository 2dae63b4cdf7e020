"""The judging texts: built-in coverage, template files and their versions."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import unblocked_after
from trig_stream.backends.judges.openai_judge import OpenAIJudge
from trig_stream.backends.judges.openai_options import OpenAIJudgeOptions
from trig_stream.backends.judges.templates import BUILTIN_VERSION, SCALE, JudgeTemplate
from trig_stream.dimensions import DIMENSION_NAMES, DIMENSIONS, TASKS
from trig_stream.errors import ConfigError
from trig_stream.testing.judge_questions import dimension_of


def test_builtin_covers_every_task_and_dimension() -> None:
    template = JudgeTemplate.builtin()
    assert template.version == BUILTIN_VERSION
    for task in TASKS:
        for dimension in DIMENSIONS:
            system = template.system_text(task, dimension, "teapot")
            assert SCALE in system
            assert f"{DIMENSION_NAMES[dimension]} ({dimension})" in system
            assert template.criteria[dimension] in system
            assert dimension_of(system) == dimension  # the loopback server can tell
            assert ("teapot" in system) == (task == "s2p")
    assert "the subject" in template.system_text("s2p", "IQ-R", None)
    assert template.user_text("t2i", "IQ-R", "a cat", None).endswith("a cat")


def test_partial_toml_keeps_the_rest_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "texts.toml"
    text = 'version = "mine-1"\n[criteria]\n"IQ-R" = "is it photographic?"\n'
    path.write_text("\ufeff" + text)  # a byte order mark, as some editors write, is skipped
    template = JudgeTemplate.load(path)
    assert template.version == f"mine-1+{BUILTIN_VERSION}"
    assert "is it photographic?" in template.system_text("t2i", "IQ-R", None)
    assert template.criteria["TA-C"] == JudgeTemplate.builtin().criteria["TA-C"]


def test_complete_json_without_version_is_versioned_by_hash(tmp_path: Path) -> None:
    builtin = JudgeTemplate.builtin().model_dump()
    del builtin["version"]
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(builtin))
    first = JudgeTemplate.load(path).version
    assert first.startswith("sha256:") and "+" not in first
    builtin["criteria"]["IQ-R"] = "changed"
    path.write_text(json.dumps(builtin))
    assert JudgeTemplate.load(path).version != first
    judge = OpenAIJudge("m", OpenAIJudgeOptions(base_url="http://a/v1", model="m", template=path))
    assert judge.fingerprint().template_version == JudgeTemplate.load(path).version


def test_the_readme_gives_the_version_a_partial_template_records(tmp_path: Path) -> None:
    # It said "the file's version, else a hash of its content": a template that leaves texts
    # built-in records the built-in texts' version too, which the README left unsaid.
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `template` |"))
    path = tmp_path / "texts.toml"
    path.write_text('version = "v1"\n')
    assert f"`{JudgeTemplate.load(path).version}`" in row


@pytest.mark.parametrize("version", ['""', '"  "'])
def test_an_empty_or_blank_version_is_refused(tmp_path: Path, version: str) -> None:
    # "" fell back to the hash without a word, "  " was recorded as the texts' name.
    path = tmp_path / "texts.toml"
    path.write_text(f'version = {version}\n[system]\nt2i = "Rate {{dimension}}: {{scale}}"\n')
    with pytest.raises(ConfigError) as raised:
        JudgeTemplate.load(path)
    assert str(raised.value) == (
        f"template {path}: invalid judge template: version: is empty or blank: name the "
        "texts (a new name whenever they change), or leave version out to have a hash of the "
        "file's content name them"
    )


@pytest.mark.parametrize(("text", "kind"), [("[1, 2]", "an array"), ('"x"', "a string")])
def test_a_json_template_that_is_no_object_says_what_it_must_hold(
    tmp_path: Path, text: str, kind: str
) -> None:
    # It said "Input should be a valid dictionary or instance of _TemplateFile".
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        JudgeTemplate.load(path)
    assert str(caught.value) == (
        f"template {path}: the template file must hold a JSON object (tables of texts such as "
        f'{{"system": {{"t2i": "..."}}}}), not {kind}'
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"system": {"t2i": "a {dimension}", "t2i": "b {dimension}"}}', "t2i"),
        ('{"version": "v1", "criteria": {}, "version": "v2"}', "version"),
    ],
)
def test_a_json_key_given_twice_is_refused(tmp_path: Path, text: str, key: str) -> None:
    # JSON kept the last of the two silently (TOML refuses it): which text was meant?
    path = tmp_path / "texts.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        JudgeTemplate.load(path)
    assert str(raised.value) == (
        f"template {path}: invalid judge template: the key {key!r} is given twice in one "
        "object; give it once"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[system]\nt2i = "rate {colour}"\n', "unknown placeholder {colour}"),
        (
            '[system]\nt2i = "{dimension}: {scale:{foo}}"\n',
            r"invalid judge template: system\.t2i: unknown placeholder {foo}",
        ),
        # Texts that never name the dimension ask both questions of an image identically.
        (
            '[system]\np2p = "Rate the edit: {scale}."\n',
            r"invalid judge template: system\.p2p: its texts read the same for IQ-R and IQ-O, "
            r"so both questions about an image would be asked identically; put "
            r"{dimension_name}, {dimension} or {criteria} in it",
        ),
        (
            '[system]\nt2i = "{criteria} {scale}"\n[criteria]\n"TA-C" = "?"\n"TA-S" = "?"\n',
            r"system\.t2i: its texts read the same for TA-C and TA-S, .*; give criteria\.TA-C "
            r"and criteria\.TA-S different texts",
        ),
        # Known placeholders that no request could fill in: refused before the run starts,
        # not as an error on every request (the message names the text).
        ('[system]\nt2i = "rate on {scale:d}"\n', r"system\.t2i: Unknown format code 'd'"),
        ('[user_prefix]\ns2p = "{item!z}: "\n', r"user_prefix\.s2p: Unknown conversion"),
        ('[system]\np2p = "rate {dimension"\n', r"system\.p2p: expected '}'"),
        ('[criteria]\n"XX-Y" = "?"\n', r"invalid judge template: criteria\.XX-Y: Input should be"),
        ("[system]\nt2i = 5\n", r"invalid judge template: system\.t2i: Input should be a valid"),
        ("version = [", "invalid judge template"),
        # A criterion is put into its task's texts as written: its {scale} reached the judge.
        (
            '[criteria]\n"IQ-R" = "realistic, on {scale}"\n',
            r"invalid judge template: criteria\.IQ-R: \{scale\} would reach the judge as it "
            r"stands: a criterion is put into its task's texts as written",
        ),
    ],
)
def test_bad_templates_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        JudgeTemplate.load(path)


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        # Found by check(): the message lacked the "template " every other one has.
        (
            "bad.toml",
            b'[system]\nt2i = "rate {colour}"\n',
            "system.t2i: unknown placeholder {colour}; known: {criteria}, {dimension}, "
            "{dimension_name}, {item}, {scale}",
        ),
        # Not UTF-8: Python's codec error came as it stands; a config's words for it now.
        # The byte is counted from the file's start, a byte order mark included.
        (
            "latin1.toml",
            '[system]\nt2i = "café {dimension}"\n'.encode("latin-1"),
            "byte 19 is not UTF-8 text",
        ),
        (
            "latin1.json",
            '{"criteria": {"IQ-R": "café"}}'.encode("latin-1"),
            "byte 26 is not UTF-8 text",
        ),
        (
            "bom.json",
            b'\xef\xbb\xbf{"criteria": {"IQ-R": "caf\xe9"}}',
            "byte 29 is not UTF-8 text",
        ),
    ],
)
def test_every_template_error_names_the_file_alike(
    tmp_path: Path, name: str, data: bytes, problem: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ConfigError) as raised:
        JudgeTemplate.load(path)
    assert str(raised.value) == f"template {path}: invalid judge template: {problem}"


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"system": {"t2i": "Rate \ud800 {dimension} {criteria} {scale}"}}, "system.t2i"),
        ({"criteria": {"IQ-R": "\udc00"}}, "criteria.IQ-R"),
        ({"version": "v\ud83d"}, "version"),
    ],
)
def test_half_a_character_is_refused_not_an_error_on_every_request(
    tmp_path: Path, data: dict[str, object], where: str
) -> None:
    # JSON's \ud800 escape reads as a lone surrogate, which no request can encode: the
    # template passed validate and every judgement of the run was an error.
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(data))
    message = rf"invalid judge template: {re.escape(where)} holds half a character"
    with pytest.raises(ConfigError, match=message):
        JudgeTemplate.load(path)


def test_braces_in_a_criterion_that_name_no_placeholder_are_text(tmp_path: Path) -> None:
    path = tmp_path / "texts.toml"
    path.write_text('[criteria]\n"IQ-R" = "{braces} and {0} stay as written, as does {"\n')
    text = JudgeTemplate.load(path).system_text("t2i", "IQ-R", None)
    assert "{braces} and {0} stay as written, as does {" in text


def test_a_dimension_named_in_the_user_prefix_alone_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "texts.toml"
    path.write_text('[system]\nt2i = "Rate: {scale}."\n[user_prefix]\nt2i = "{dimension_name}: "\n')
    template = JudgeTemplate.load(path)
    assert template.user_text("t2i", "IQ-R", "a cat", None) == "Realism: a cat"


def test_missing_template_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read judge template"):
        JudgeTemplate.load(tmp_path / "absent.toml")


def test_a_template_that_is_a_pipe_is_refused_not_waited_on(tmp_path: Path) -> None:
    # Reading a named pipe waited for a writer: validate and run hung.
    fifo = tmp_path / "template.toml"
    os.mkfifo(fifo)
    with unblocked_after(fifo, 10) as fired, pytest.raises(ConfigError) as raised:
        JudgeTemplate.load(fifo)
    assert not fired
    assert str(raised.value) == (
        f"template {fifo}: cannot read judge template: it is a named pipe (FIFO), not a "
        "file; name a template file (.toml or .json)"
    )


def test_a_template_that_is_a_device_or_too_large_is_refused_without_reading_it(
    tmp_path: Path,
) -> None:
    # /dev/zero was read until memory ran out (a MemoryError traceback); /dev/null stands
    # for the devices here, a sparse file for one too large to be a template.
    with pytest.raises(ConfigError, match="it is a character device, not a file; name a"):
        JudgeTemplate.load(Path(os.devnull))
    large = tmp_path / "large.toml"
    with large.open("wb") as file:
        file.truncate(16 * 2**20 + 1)  # past the limit of a settings file
    with pytest.raises(ConfigError, match=r"large\.toml: cannot read judge template: it is"):
        JudgeTemplate.load(large)


@pytest.mark.parametrize(
    ("name", "text"),
    [("deep.json", "[" * 100_000 + "]" * 100_000), ("deep.toml", "x = " + "[" * 5000 + "]" * 5000)],
    ids=["json", "toml"],
)
def test_a_template_nested_too_deep_is_refused_in_one_line(
    tmp_path: Path, name: str, text: str
) -> None:
    # The readers recurse once per level: a RecursionError traceback ended validate and run.
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        JudgeTemplate.load(path)
    assert str(raised.value) == (
        f"template {path}: invalid judge template: arrays or tables nested too deep to read; "
        "a template holds tables of texts"
    )
