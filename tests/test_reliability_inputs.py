"""Broken inputs: configs, dataset records, source images and hostile names.

* A broken config gives one clear message and the documented exit code, through the same
  ``main`` the console script runs, without a traceback.
* A broken dataset record or source image is set aside with its reason and the run goes on.
* No data_id, img_id or model name makes the run write outside its run directory.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import polars as pl
import pytest
from PIL import Image

from tests.conftest import write_prompts
from trig_stream.backends.base import GenerationRequest
from trig_stream.backends.generators.source_images import source_image
from trig_stream.cli import main
from trig_stream.config import MAX_CONFIG_BYTES, RunConfig, parse_config
from trig_stream.engine import Engine
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_FATAL, EXIT_OK, EXIT_RUN_DIR
from trig_stream.journal import JOURNAL, read_journal
from trig_stream.manifest import Manifest
from trig_stream.quarantine_text import QUARANTINE
from trig_stream.records import Judgement, QuarantinedRecord
from trig_stream.store import RunDir
from trig_stream.testing import SyntheticGenerator
from trig_stream.testing.synthetic import SyntheticOptions

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

CONFIG = """\
[run]
name = "broken"
output_dir = "runs"

[dataset]
path = "prompts.json"

[[generators]]
name = "synth"
backend = "synthetic"
options = { size = 16 }

[[judges]]
backend = "fake"
concurrency = 4

[engine]
sample_buffer = 2
"""

Edit = Callable[[str], str]


def replace(old: str, new: str) -> Edit:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


def append(extra: str) -> Edit:
    return lambda text: text + extra


# (case, edit of the good config, exit code, fragment of the one message)
BROKEN_CONFIGS: list[tuple[str, Edit, int, str]] = [
    ("unknown key", append("turbo = true\n"), EXIT_CONFIG, "engine.turbo: unknown key"),
    (
        "wrong type",
        replace("concurrency = 4", 'concurrency = "many"'),
        EXIT_CONFIG,
        "judges[0].concurrency",
    ),
    ("out of range", replace("sample_buffer = 2", "sample_buffer = 0"), EXIT_CONFIG, "sample_buf"),
    ("run name missing", replace('name = "broken"\n', ""), EXIT_CONFIG, "run.name"),
    ("run name escapes", replace('"broken"', '"../../escape"'), EXIT_CONFIG, "run.name"),
    ("model name escapes", replace('"synth"', '"../synth"'), EXIT_CONFIG, "generators[0].name"),
    ("model name is a path", replace('"synth"', '"/tmp/synth"'), EXIT_CONFIG, "generators[0].name"),
    (
        "judge name escapes",
        replace('backend = "fake"', 'name = "../j"\nbackend = "fake"'),
        EXIT_CONFIG,
        "judges[0].name",
    ),
    ("unknown backend", replace('"fake"', '"nope"'), EXIT_CONFIG, "unknown backend 'nope'"),
    ("bad backend option", replace("size = 16", "size = -1"), EXIT_CONFIG, "options.size"),
    ("unknown backend option", replace("size = 16", "turbo = 1"), EXIT_CONFIG, "options.turbo"),
    ("not TOML", replace("[engine]", "[engine"), EXIT_CONFIG, "not valid TOML"),
    ("unknown task", replace("[run]", '[run]\ntask = "x2y"'), EXIT_CONFIG, "unknown task 'x2y'"),
    (
        "unknown pair filter",
        replace("[dataset]", '[dataset]\npairs = ["IQ-R_XX-Y"]'),
        EXIT_CONFIG,
        "dataset.pairs",
    ),
    (
        "unknown correlation",
        append('\n[relation]\ncorrelation = "kendall"\n'),
        EXIT_CONFIG,
        "relation.correlation",
    ),
    (
        "duplicate judge",
        append('\n[[judges]]\nbackend = "fake"\n'),
        EXIT_CONFIG,
        "'trigscore' is used twice",
    ),
    (
        "openai judge without endpoint",
        replace('backend = "fake"', 'backend = "openai"\noptions = { model = "m" }'),
        EXIT_CONFIG,
        "set exactly one of base_url",
    ),
    (
        "judge port out of range",
        replace(
            'backend = "fake"',
            'backend = "openai"\noptions = { model = "m", base_url = "http://127.0.0.1:99999/v1" }',
        ),
        EXIT_CONFIG,
        "judges[0].options.base_url: not a URL: Port out of range",
    ),
    (
        "judge URL without a scheme",
        replace(
            'backend = "fake"',
            'backend = "openai"\noptions = { model = "m", base_urls = ["127.0.0.1:8000/v1"] }',
        ),
        EXIT_CONFIG,
        "judges[0].options.base_urls[0]: not an http:// or https:// URL",
    ),
    (
        "judge server listed twice",
        replace(
            'backend = "fake"',
            'backend = "openai"\noptions = { model = "m", base_urls = '
            '["http://gpu:8000/v1", "http://10.0.0.2:8000/v1", "HTTP://GPU:8000/v1/"] }',
        ),
        EXIT_CONFIG,
        "judges[0].options.base_urls: base_urls[0] ('http://gpu:8000/v1') and base_urls[2] "
        "('HTTP://GPU:8000/v1/') are the same endpoint",
    ),
    (
        "no generators",
        replace(
            '[[generators]]\nname = "synth"\nbackend = "synthetic"\noptions = { size = 16 }\n', ""
        ),
        EXIT_CONFIG,
        "generators",
    ),
    ("dataset missing", replace("prompts.json", "absent.json"), EXIT_FATAL, "does not exist"),
    ("dataset not JSON", replace("prompts.json", "garbage.json"), EXIT_FATAL, "cannot read"),
    (
        "dataset name too long",
        replace("prompts.json", "p" * 300 + ".json"),
        EXIT_FATAL,
        "cannot be looked up: File name too long; check [dataset] path",
    ),
    ("dataset not a list", replace("prompts.json", "number.json"), EXIT_FATAL, "JSON list"),
    (
        "dataset of an unknown kind",
        replace("prompts.json", "prompts.csv"),
        EXIT_FATAL,
        "since its name ends in none of .json, .jsonl and .ndjson; set [dataset] format",
    ),
    (
        "JSON dataset read as parquet by its format",
        replace('path = "prompts.json"', 'path = "prompts.json"\nformat = "parquet"'),
        EXIT_FATAL,
        'since [dataset] format = "parquet" is set; set format = "json" or "jsonl" if it is JSON',
    ),
    (
        "dataset not parquet",
        replace('path = "prompts.json"', 'path = "garbage.json"\nformat = "parquet"'),
        EXIT_FATAL,
        "cannot read parquet",
    ),
    (
        "judge key variable unset",
        replace(
            'backend = "fake"',
            'backend = "openai"\noptions = { model = "m", base_url = "http://127.0.0.1:9/v1",'
            ' api_key_env = "TRIG_RELIABILITY_UNSET_KEY" }',
        ),
        EXIT_FATAL,
        "TRIG_RELIABILITY_UNSET_KEY (api_key_env) is not set",
    ),
    (
        "output folder is a file",
        replace('output_dir = "runs"', 'output_dir = "number.json"'),
        EXIT_RUN_DIR,
        "cannot create the run directory",
    ),
]


@pytest.mark.parametrize(
    ("edit", "code", "fragment"),
    [pytest.param(e, c, f, id=name) for name, e, c, f in BROKEN_CONFIGS],
)
def test_broken_config_gives_one_clear_message_and_its_exit_code(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    edit: Edit,
    code: int,
    fragment: str,
) -> None:
    monkeypatch.delenv("TRIG_RELIABILITY_UNSET_KEY", raising=False)
    write_prompts(tmp_path / "prompts.json", 4)
    (tmp_path / "garbage.json").write_text("garbage{")
    (tmp_path / "number.json").write_text("42")
    (tmp_path / "prompts.csv").write_text("data_id,prompt\n")
    path = tmp_path / "run.toml"
    path.write_text(edit(CONFIG))
    assert main(["run", str(path), "--headless", "--no-report"]) == code
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    assert fragment in err, err
    assert "Traceback" not in err
    if code == EXIT_CONFIG:  # refused before any work: nothing written
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("absent.toml", None, "cannot read config"),
        ("folder", "", "cannot read config: Is a directory"),
        ("utf16.toml", "[run]\n".encode("utf-16"), "byte 0 is not UTF-8 text"),
    ],
    ids=["missing", "a-folder", "not-utf8"],
)
def test_unreadable_config_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: bytes | str | None,
    fragment: str,
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.mkdir()
    assert main(["run", str(path), "--headless"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and fragment in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_config_that_is_a_socket_or_too_large_is_refused_without_reading_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # `trig-stream run /dev/zero` read the device for ever; a pipe waits for its writer.
    # A socket stands for them here: opening one fails (ENXIO), which said nothing useful.
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s"))
        assert main([command, str(tmp_path / "s")]) == EXIT_CONFIG
    finally:
        sock.close()
    err = capsys.readouterr().err
    assert "cannot read config: it is a socket, not a file; name a TOML config file" in err, err
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as file:  # sparse: no disk space taken
        file.truncate(MAX_CONFIG_BYTES + 1)
    assert main([command, str(huge)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "larger than 16 MiB" in err, err


def quarantined(config: RunConfig) -> dict[str | None, str]:
    lines = (config.run_dir / QUARANTINE).read_text().splitlines()
    return {record["data_id"]: record["reason"] for record in map(json.loads, lines)}


def run_engine(config: RunConfig, **kwargs: Any) -> list[Judgement]:
    async def go() -> None:
        async with Engine(config, **kwargs) as engine:
            await engine.drain()

    anyio.run(go)
    return list(read_journal(config.run_dir / JOURNAL))


def make_config(tmp_path: Path, dataset: dict[str, Any], task: str = "t2i") -> RunConfig:
    return parse_config(
        {
            "run": {"name": "inputs", "output_dir": str(tmp_path / "runs"), "task": task},
            "dataset": dataset,
            "generators": [{"name": "synth", "backend": "synthetic", "options": {"size": 16}}],
            "judges": [{"name": "trigscore", "backend": "fake"}],
        },
        source=tmp_path / "config.toml",
    )


GOOD = {"data_id": "IQ-R_TA-C_1", "prompt": "fine", "dimension": ["IQ-R", "TA-C"]}


def test_broken_records_are_quarantined_with_reasons_and_the_run_goes_on(tmp_path: Path) -> None:
    broken: list[tuple[Any, str]] = [
        ({"prompt": "no id", "dimension": ["IQ-R", "TA-C"]}, "missing data_id"),
        (
            {"data_id": 7, "prompt": "numeric id", "dimension": ["IQ-R", "TA-C"]},
            "data_id must be text",
        ),
        ({"data_id": "IQ-R_TA-C_2", "prompt": "   ", "dimension": ["IQ-R", "TA-C"]}, "prompt"),
        ({"data_id": "IQ-R_TA-C_3", "prompt": 5, "dimension": ["IQ-R", "TA-C"]}, "prompt"),
        ({"data_id": "IQ-R_TA-C_4", "prompt": "x", "dimension": ["IQ-R"]}, "two dimension"),
        ({"data_id": "IQ-R_TA-C_5", "prompt": "x", "dimension": ["IQ-R", 3]}, "two dimension"),
        ({"data_id": "IQ-R_TA-C_6", "prompt": "x", "dimension": ["IQ-R", "XX-Y"]}, "XX-Y"),
        ({"data_id": "no-pair-here", "prompt": "x"}, "no-pair-here"),
        ({"data_id": "IQ-R_TA-C_7", "prompt": "x", "img_id": 12}, "img_id"),
        ({"data_id": "IQ-R_TA-C_1", "prompt": "again", "dimension": ["IQ-R", "TA-C"]}, "duplicate"),
        ("not an object", "is a JSON string, not a record"),
    ]
    records = [GOOD, *(record for record, _ in broken)]
    (tmp_path / "prompts.json").write_text(json.dumps(records))
    config = make_config(tmp_path, {"path": str(tmp_path / "prompts.json")})
    judgements = run_engine(config)
    assert {(j.data_id, j.status) for j in judgements} == {("IQ-R_TA-C_1", "ok")}
    lines = (config.run_dir / QUARANTINE).read_text().splitlines()
    reasons = {record["index"]: record["reason"] for record in map(json.loads, lines)}
    assert sorted(reasons) == list(range(1, len(records)))
    for index, (_, expected) in enumerate(broken, start=1):
        assert expected in reasons[index], (index, reasons[index])


def png_bytes(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def p2p_dataset(tmp_path: Path) -> dict[str, Any]:
    """A p2p JSON dataset: one good source image and one of each kind of broken one."""
    root = tmp_path / "sources"
    root.mkdir()
    (root / "good.png").write_bytes(png_bytes())
    (root / "truncated.png").write_bytes(png_bytes(64)[:60])
    (root / "text.png").write_text("this is not an image")
    (tmp_path / "outside.png").write_bytes(png_bytes())
    ids = {
        "good.png": "IQ-R_TA-C_1",
        "missing.png": "IQ-R_TA-C_2",
        "truncated.png": "IQ-R_TA-C_3",
        "text.png": "IQ-R_TA-C_4",
        "../outside.png": "IQ-R_TA-C_5",
        str(tmp_path / "outside.png"): "IQ-R_TA-C_6",
    }
    records = [
        {"data_id": data_id, "prompt": "make it blue", "dimension": ["IQ-R", "TA-C"], "img_id": img}
        for img, data_id in ids.items()
    ]
    (tmp_path / "p2p.json").write_text(json.dumps(records))
    return {"path": str(tmp_path / "p2p.json"), "image_root": str(root)}


class SourceReadingGenerator(SyntheticGenerator):
    """The synthetic generator, made to decode each sample's source image as an editing
    pipeline does (and to fail the sample as it would when that image is broken)."""

    reads_source_image = True

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[PILImage | Exception]:
        out: list[PILImage | Exception] = []
        for request in requests:
            try:
                source_image(request.sample)
            except Exception as exc:
                out.append(exc)
                continue
            out.extend(super().generate([request], worker=worker, cancel=cancel))
        return out


def test_broken_p2p_source_images_never_stop_the_run(tmp_path: Path) -> None:
    config = make_config(tmp_path, p2p_dataset(tmp_path), task="p2p")
    generator = SourceReadingGenerator("synth", SyntheticOptions(size=16))
    judgements = run_engine(config, generators=[generator])
    reasons = quarantined(config)
    assert "not found" in reasons["IQ-R_TA-C_2"]
    assert "plain file name" in reasons["IQ-R_TA-C_5"]
    assert "plain file name" in reasons["IQ-R_TA-C_6"]
    by_id = {(j.data_id, j.dimension): j for j in judgements}
    assert {d for d, _ in by_id} <= {"IQ-R_TA-C_1", "IQ-R_TA-C_3", "IQ-R_TA-C_4"}
    assert by_id["IQ-R_TA-C_1", "IQ-R"].status == "ok"
    # Whether quarantined up front or failed at generation, a broken image never gets a score.
    for data_id in ("IQ-R_TA-C_3", "IQ-R_TA-C_4"):
        if data_id in reasons:
            continue
        for dimension in ("IQ-R", "TA-C"):
            judgement = by_id[data_id, dimension]
            assert judgement.status == "error" and judgement.score is None
            assert judgement.error_stage == "generate"
            assert "cannot read image" in (judgement.error or ""), judgement.error


@pytest.mark.parametrize("data_id", ["IQ-R_TA-C_3", "IQ-R_TA-C_4"])
def test_undecodable_p2p_source_images_are_quarantined(tmp_path: Path, data_id: str) -> None:
    config = make_config(tmp_path, p2p_dataset(tmp_path), task="p2p")
    run_engine(config, generators=[SourceReadingGenerator("synth", SyntheticOptions(size=16))])
    assert data_id in quarantined(config)


HOSTILE_IDS = ["../../x", "..", "a/../../b", "sub/x", "x\\..\\y", ".hidden", "-rf", "x" * 300]


def tree(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_no_data_id_or_img_id_writes_outside_the_run_dir(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "abs-target"
    hostile = [*HOSTILE_IDS, str(target / "x"), f"{tmp_path}/../escaped"]
    ids = ["IQ-R_TA-C_1", *hostile]
    if fmt == "json":
        records = [
            {"data_id": data_id, "prompt": "p", "dimension": ["IQ-R", "TA-C"]} for data_id in ids
        ]
        dataset = tmp_path / "prompts.json"
        dataset.write_text(json.dumps(records))
    else:
        dataset = tmp_path / "prompts.parquet"
        pl.DataFrame(
            {
                "data_id": ids,
                "prompt": ["p"] * len(ids),
                "dimensions": [["IQ-R", "TA-C"]] * len(ids),
            }
        ).write_parquet(dataset)
    config = make_config(tmp_path, {"path": str(dataset)})
    before = tree(tmp_path.parent)
    judgements = run_engine(config)
    assert {j.data_id for j in judgements} == {"IQ-R_TA-C_1"}
    assert set(quarantined(config)) == set(hostile)
    created = tree(tmp_path.parent) - before
    outside = {p for p in created if not p.is_relative_to(config.run_dir)}
    assert outside <= {config.run.output_dir}, outside
    assert not target.exists()
    assert not (tmp_path.parent / "escaped").exists()


def test_a_good_run_of_these_inputs_still_exits_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control for the catalogue above: the unedited config runs to the end."""
    write_prompts(tmp_path / "prompts.json", 4)
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    assert "error:" not in capsys.readouterr().err


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_records_holding_bytes_or_deep_nesting_are_quarantined_not_a_crash(
    tmp_path: Path, fmt: str
) -> None:
    # An image list as HF's Sequence(Image()) writes it, a list<binary> column, a field nested
    # deeper than any JSON writer goes: the quarantine file must still hold each record.
    if fmt == "parquet":
        dataset = tmp_path / "prompts.parquet"
        pl.DataFrame(
            {
                "data_id": ["IQ-R_TA-C_1", "IQ-R_TA-C_2"],
                "prompt": ["", "fine"],
                "dimensions": [["IQ-R", "TA-C"]] * 2,
                "images": [[{"bytes": png_bytes(), "path": None}]] * 2,
                "blobs": [[b"\xff\xfe"], [b"\xff"]],
                "struct": [{"inner": {"bytes": b"\xff", "path": "p"}}] * 2,
            }
        ).write_parquet(dataset)
    else:
        dataset = tmp_path / "prompts.jsonl"
        records = [
            {"data_id": "IQ-R_TA-C_1", "prompt": "", "deep": nested(300)},
            {"data_id": "IQ-R_TA-C_2", "prompt": "fine", "deep": nested(300)},
        ]
        dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = make_config(tmp_path, {"path": str(dataset)})
    judgements = run_engine(config)
    assert {(j.data_id, j.status) for j in judgements} == {("IQ-R_TA-C_2", "ok")}
    [line] = (config.run_dir / QUARANTINE).read_text().splitlines()
    refused = json.loads(line)
    assert refused["data_id"] == "IQ-R_TA-C_1" and "prompt" in refused["reason"]
    record = refused["record"]
    if fmt == "parquet":
        assert record["images"] == [{"bytes": f"<{len(png_bytes())} bytes omitted>", "path": None}]
        assert record["blobs"] == ["<2 bytes omitted>"]
        assert record["struct"] == {"inner": {"bytes": "<1 bytes omitted>", "path": "p"}}
    else:
        kept: Any = record["deep"]
        depth = 0
        while isinstance(kept, list):
            [kept] = kept
            depth += 1
        # Cut short: the levels kept, then the rest as the start of its text.
        assert 1 <= depth < 300 and isinstance(kept, str)
        assert kept.startswith("[[") and kept.endswith("...") and len(kept) < 300


def test_a_record_json_cannot_write_still_reaches_the_quarantine_file(tmp_path: Path) -> None:
    # The net under the dataset reader's care: whatever a record holds, writing it never
    # raises, so a resume does not crash on it every time.
    run, _ = RunDir.open(tmp_path, Manifest(run_name="r", task="t2i"))
    with run:
        run.quarantine(
            QuarantinedRecord(
                index=3, data_id="IQ-R_TA-C_1", reason="missing prompt", record={"b": b"\xff"}
            )
        )
    [line] = (tmp_path / QUARANTINE).read_text().splitlines()
    refused = json.loads(line)
    assert refused["index"] == 3 and refused["reason"] == "missing prompt"
    assert "cannot be written as JSON" in refused["record"]["unwritable"]
