"""The judge's API key never leaves the process: not on disk, in output, logs or errors.

Whole runs (the engine and the command line) judge with the ``openai`` backend against the
simulated judge, which requires a key and, like some providers, quotes the key it received in
its 401 message. The key sits in an environment variable; afterwards every file of the run
directory, everything printed, every log record and the error raised are searched for it.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_prompts
from trig_stream.cli import main
from trig_stream.config import load_config
from trig_stream.engine import Engine
from trig_stream.errors import FatalBackendError
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_FATAL, EXIT_OK

KEY = f"sk-trig-{secrets.token_hex(16)}"
"""The key the server requires."""
WRONG_KEY = f"sk-trig-{secrets.token_hex(16)}"
"""A key the server refuses (and quotes back)."""
KEY_ENV = "TRIG_SECRETS_TEST_KEY"
SAMPLES = 6

CONFIG = """\
[run]
name = "{name}"
output_dir = "runs"

[dataset]
path = "prompts.json"

[[generators]]
name = "synth"
backend = "synthetic"
options = {{ size = 16 }}

[[judges]]
backend = "openai"
concurrency = 4

[judges.options]
base_url = "{base_url}"
model = "trig-judge-sim"
api_key_env = "{env}"
client = "{client}"
"""


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The simulated judge in its own process, requiring ``KEY``."""
    env = {**os.environ, "TRIG_SERVER_KEY": KEY}
    command = [sys.executable, "-m", "trig_stream", "simulate-judge", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--api-key-env", "TRIG_SERVER_KEY"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # ends if the server dies before it is ready
            if line.startswith("READY "):
                yield line.split()[1]
                break
        else:
            pytest.fail("the simulated judge did not start")
    finally:
        process.terminate()
        process.wait(timeout=30)


def write_config(tmp_path: Path, base_url: str, name: str, client: str = "aiohttp") -> Path:
    write_prompts(tmp_path / "prompts.json", SAMPLES)
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(name=name, base_url=base_url, env=KEY_ENV, client=client))
    return path


def assert_nowhere(key: str, *texts: str, folder: Path | None = None) -> None:
    """Neither the key nor a piece of it in the texts or in any file under ``folder``."""
    pieces = [key, key[8:24], key[-16:]]
    for text in texts:
        for piece in pieces:
            assert piece not in text
    files = [p for p in folder.rglob("*") if p.is_file()] if folder else []
    for path in files:
        data = path.read_bytes()
        for piece in pieces:
            assert piece.encode() not in data, f"{path} holds the key"
    if folder is not None:
        assert files, "the run wrote nothing"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # the HTTP libraries' debug records included
    return caplog


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("client", ["aiohttp", "http"])
async def test_engine_run(
    client: str,
    tmp_path: Path,
    base_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    logs: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    config = load_config(write_config(tmp_path, base_url, "engine-ok", client))
    async with Engine(config) as engine:
        summary = await engine.drain()
    assert summary.ok == summary.judged == 2 * SAMPLES
    out, err = capsys.readouterr()
    assert_nowhere(KEY, out, err, logs.text, folder=summary.run_dir)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("client", ["aiohttp", "http"])
async def test_engine_run_with_a_wrong_key(
    client: str,
    tmp_path: Path,
    base_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    logs: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    config = load_config(write_config(tmp_path, base_url, "engine-wrong", client))
    engine = Engine(config)
    with pytest.raises(FatalBackendError) as caught:
        async with engine:
            await engine.drain()
    error = caught.value
    assert "rejected the API key (HTTP 401)" in str(error) and KEY_ENV in str(error)
    shown = "".join(traceback.format_exception(error))
    out, err = capsys.readouterr()
    records = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_info!r}" for r in logs.records)
    for key in (WRONG_KEY, KEY):
        assert_nowhere(key, str(error), repr(error), shown, out, err, logs.text, records)
        assert_nowhere(key, folder=engine.run_dir_path)
        assert_nowhere(key, *engine.stats().last_errors)


def test_command_line_run(
    tmp_path: Path,
    base_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    logs: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(write_config(tmp_path, base_url, "cli-ok")), "--headless"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "done: 12 judgements" in err
    assert_nowhere(KEY, out, err, logs.text, folder=tmp_path / "runs" / "cli-ok")


def test_command_line_run_with_a_wrong_key(
    tmp_path: Path,
    base_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    logs: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    config = write_config(tmp_path, base_url, "cli-wrong")
    assert main(["run", str(config), "--headless"]) == EXIT_FATAL
    out, err = capsys.readouterr()
    assert "rejected the API key" in err
    for key in (WRONG_KEY, KEY):
        assert_nowhere(key, out, err, logs.text, folder=tmp_path / "runs" / "cli-wrong")


def test_options_built_in_python_never_show_a_refused_secret() -> None:
    # An embedding application's own options: the validation error's text quoted the URL,
    # password and all.
    from pydantic import ValidationError

    from trig_stream.backends.judges.openai_options import OpenAIJudgeOptions

    with pytest.raises(ValidationError) as raised:
        OpenAIJudgeOptions(model="m", base_url="http://user:pw-secret@host/v1")
    assert "holds credentials" in str(raised.value) and "pw-secret" not in str(raised.value)


PASTED_KEY = f"sk-proj-{secrets.token_hex(16)}"
"""An API key pasted where the name of its variable goes."""
PASTED = [
    ("judges", "openai", f'model = "m", base_url = "http://h/v1", api_key_env = "{PASTED_KEY}"'),
    ("generators", "openai_images", f'api_key_env = "{PASTED_KEY}"'),
    (
        "generators",
        "dtm_rewrite",
        f'model = "llm", api_key_env = "{PASTED_KEY}", relations = {{ IQ-R_TA-C = 1 }}, '
        'inner = { backend = "synthetic" }',
    ),
    (
        "generators",
        "dtm_rewrite",
        'model = "llm", relations = { IQ-R_TA-C = 1 }, inner = { backend = "openai_images", '
        f'options = {{ api_key_env = "{PASTED_KEY}" }} }}',
    ),
]


@pytest.mark.parametrize(
    ("kind", "backend", "options"), PASTED, ids=["openai", "openai_images", "dtm_rewrite", "inner"]
)
def test_a_key_pasted_as_api_key_env_is_refused_unquoted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, backend: str, options: str
) -> None:
    # Every message naming the variable printed the key, and the run saved it in its manifest.
    entries = {
        "generators": '[[generators]]\nname = "g"\nbackend = "synthetic"\n',
        "judges": '[[judges]]\nbackend = "fake"\n',
    }
    entries[kind] = f'[[{kind}]]\nname = "x"\nbackend = "{backend}"\noptions = {{ {options} }}\n'
    config = tmp_path / "pasted.toml"
    config.write_text(
        '[run]\nname = "pasted"\n\n[dataset]\npath = "prompts.json"\n\n'
        + entries["generators"]
        + "\n"
        + entries["judges"]
    )
    write_prompts(tmp_path / "prompts.json", 1)
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert "api_key_env" in err and "not the name of an environment variable" in err
        assert_nowhere(PASTED_KEY, err)
    assert not (tmp_path / "runs").exists()


def test_a_variable_name_and_none_are_taken_as_api_key_env() -> None:
    from trig_stream.backends.generators.openai_images import OpenAIImagesOptions

    for name in ("OPENAI_API_KEY", "_key2", ""):
        assert OpenAIImagesOptions(api_key_env=name).api_key_env == name


@pytest.mark.parametrize(
    "serve",
    [
        'command = ["vllm", "serve", "m", "--port", "{port}", "--api-key", "@KEY@"]',
        'command = ["vllm", "serve", "m", "--port", "{port}", "--api-key=@KEY@"]',
        'command = ["vllm", "serve", "m", "--port", "{port}"], env = { VLLM_API_KEY = "@KEY@" }',
    ],
    ids=["argument", "glued", "env"],
)
def test_a_key_in_a_serve_command_or_env_is_refused_unquoted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    serve: str,
) -> None:
    # The key went into manifest.json and into "opening judge 'trigscore': starting its
    # server `... --api-key sk-...`", unmasked.
    monkeypatch.setenv(KEY_ENV, KEY)
    config = tmp_path / "serve.toml"
    config.write_text(
        CONFIG.replace('base_url = "{base_url}"\n', "").format(
            name="serve", env=KEY_ENV, client="http"
        )
        + f"serve = {{ {serve.replace('@KEY@', KEY)} }}\n"
    )
    write_prompts(tmp_path / "prompts.json", 1)
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_FATAL
        err = capsys.readouterr().err
        assert "holds an API key" in err and "pass it through the environment" in err, err
        assert_nowhere(KEY, err)
    assert not (tmp_path / "runs").exists()


OTHER_KEY = f"sk-other-{secrets.token_hex(16)}"
"""The key of another backend of the run than the judge whose server is started."""
OTHER_ENV = "TRIG_SECRETS_TEST_OTHER_KEY"
OTHERS = {
    "generator": (
        f'[[generators]]\nname = "dalle"\nbackend = "openai_images"\n'
        f'options = {{ api_key_env = "{OTHER_ENV}" }}\n\n'
    ),
    "judge": (
        f'[[judges]]\nname = "second"\nbackend = "openai"\noptions = {{ model = "m", '
        f'base_url = "http://h/v1", api_key_env = "{OTHER_ENV}" }}\n\n'
    ),
}


@pytest.mark.parametrize("owner", ["generator", "judge"])
@pytest.mark.parametrize(
    "serve",
    [
        'command = ["vllm", "serve", "m", "--port", "{port}", "--api-key", "@KEY@"]',
        'command = ["vllm", "serve", "m", "--port", "{port}"], env = { VLLM_API_KEY = "@KEY@" }',
    ],
    ids=["argument", "env"],
)
def test_another_backends_key_in_a_serve_command_or_env_is_refused_unquoted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    owner: str,
    serve: str,
) -> None:
    # Only the judge's own key was looked for: another backend's went into manifest.json
    # and the command line shown while the server started.
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv(OTHER_ENV, OTHER_KEY)
    config = tmp_path / "serve.toml"
    config.write_text(
        '[run]\nname = "serve"\n\n[dataset]\npath = "prompts.json"\n\n'
        '[[generators]]\nname = "synth"\nbackend = "synthetic"\n\n'
        + OTHERS["generator"]
        * (owner == "generator")
        + f'[[judges]]\nname = "first"\nbackend = "openai"\n[judges.options]\nmodel = "m"\n'
        f'api_key_env = "{KEY_ENV}"\nserve = {{ {serve.replace("@KEY@", OTHER_KEY)} }}\n\n'
        + OTHERS["judge"]
        * (owner == "judge")
    )
    write_prompts(tmp_path / "prompts.json", 1)
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_FATAL
        err = capsys.readouterr().err
        assert "holds an API key" in err and "pass it through the environment" in err, err
        assert_nowhere(OTHER_KEY, err)
    assert not (tmp_path / "runs").exists()


PADDED = [
    ("judges", "openai", f'model = "m", base_url = "http://h/v1", api_key_env = "{KEY_ENV}"'),
    ("generators", "openai_images", f'api_key_env = "{KEY_ENV}"'),
    (
        "generators",
        "dtm_rewrite",
        f'model = "llm", api_key_env = "{KEY_ENV}", relations = {{ IQ-R_TA-C = 1 }}, '
        'inner = { backend = "synthetic" }',
    ),
    (
        "generators",
        "dtm_rewrite",
        'model = "llm", api_key_env = "", relations = { IQ-R_TA-C = 1 }, inner = { backend = '
        f'"openai_images", options = {{ api_key_env = "{KEY_ENV}" }} }}',
    ),
]


@pytest.mark.parametrize("padded", [f" {KEY} ", f"{KEY} "], ids=["around", "after"])
@pytest.mark.parametrize(
    ("kind", "backend", "options"), PADDED, ids=["openai", "openai_images", "dtm_rewrite", "inner"]
)
def test_a_key_with_spaces_around_it_is_refused_unquoted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    padded: str,
    kind: str,
    backend: str,
    options: str,
) -> None:
    # Servers strip the spaces and quote the bare key (a 500's body, a 302's Location), which
    # masking the padded key missed: it went into the journal, the report and stderr (and,
    # held by serve.env, into the manifest). A trailing space made the SDK's clients refuse
    # the header: "cannot reach the API ... is it running?".
    monkeypatch.setenv(KEY_ENV, padded)
    entries = {
        "generators": '[[generators]]\nname = "g"\nbackend = "synthetic"\n',
        "judges": '[[judges]]\nbackend = "fake"\n',
    }
    entries[kind] = f'[[{kind}]]\nname = "x"\nbackend = "{backend}"\noptions = {{ {options} }}\n'
    config = tmp_path / "padded.toml"
    config.write_text(
        '[run]\nname = "padded"\n\n[dataset]\npath = "prompts.json"\n\n'
        + entries["generators"]
        + "\n"
        + entries["judges"]
    )
    write_prompts(tmp_path / "prompts.json", 1)
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_FATAL
        out, err = capsys.readouterr()
        assert f"the environment variable {KEY_ENV} (api_key_env)" in err, err
        assert "spaces" in err
        assert_nowhere(KEY, out, err)
    assert not (tmp_path / "runs").exists()
