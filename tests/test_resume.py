"""The run directory: resume, fingerprints, torn journals, locks, retrying errors."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any

import anyio.to_thread
import pytest
from PIL import Image

from tests.conftest import ConfigFactory, count_reads, write_prompts
from tests.test_engine import journal, keys_count, run_to_end
from tests.test_png import BROKEN_IMAGE_DATA, png_with_image_data, text_chunk
from trig_stream import (
    Engine,
    FingerprintMismatch,
    RunDirError,
    RunLockedError,
    persisting,
    reuse,
    store,
)
from trig_stream import files as files_module
from trig_stream import journal as journal_module
from trig_stream import manifest as manifest_module
from trig_stream.backends.base import EncodedPicture, GenerationRequest
from trig_stream.config import RunConfig, load_config
from trig_stream.errors import FatalBackendError, ItemError
from trig_stream.files import (
    UnfitFileError,
    write_all,
    write_atomic,
    write_atomic_many,
    write_atomic_together,
)
from trig_stream.journal import (
    JOURNAL,
    Journal,
    JournalState,
    line_problem,
    parse_journal_line,
    read_journal,
)
from trig_stream.locks import LOCK, Writer, find_writer
from trig_stream.manifest import (
    IMAGES,
    MANIFEST,
    MANIFEST_VERSION,
    Manifest,
    as_json,
    read_manifest,
)
from trig_stream.moves import Move
from trig_stream.new_runs import next_free_run_dir
from trig_stream.persisting import PersistStage
from trig_stream.png import (
    PIXELS_KEY,
    PIXELS_WHOLE,
    SAMPLE_KEY,
    SIGNATURE,
    encode_png,
    pixel_data_problem,
    with_sample_digest,
)
from trig_stream.quarantine_text import QUARANTINE, QUARANTINE_PARTIAL
from trig_stream.records import JudgeFingerprint, Judgement, QuarantinedRecord, Status
from trig_stream.resume_checks import check_resume, resumed_manifest
from trig_stream.run_dir_paths import PARTIAL
from trig_stream.scoring import SCORING_RULES
from trig_stream.testing import FakeJudge, SyntheticGenerator
from trig_stream.testing.fake_judge import FakeJudgeOptions
from trig_stream.testing.synthetic import SyntheticOptions

pytestmark = pytest.mark.anyio

SYNTH_AND_OTHER = [
    {"name": "synth", "backend": "synthetic", "options": {"size": 16}},
    {"name": "other", "backend": "synthetic", "options": {"size": 16}},
]


async def test_second_run_reuses_images_and_asks_nothing(make_config: ConfigFactory) -> None:
    config = make_config(samples=10)
    await run_to_end(config)
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    judge = FakeJudge()
    results = await run_to_end(config, generators=[generator], judges=[judge])
    assert results == []
    assert generator.calls == []
    assert judge.requests == 0
    assert len(journal(config)) == 20


async def test_missing_judgements_are_asked_with_images_reused(make_config: ConfigFactory) -> None:
    config = make_config(samples=10)
    await run_to_end(config)
    path = config.run_dir / JOURNAL
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-5]) + "\n")  # lose the last five judgements
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    judge = FakeJudge()
    async with Engine(config, generators=[generator], judges=[judge]) as engine:
        results = [j async for j in engine.results]
        stats = engine.stats()
    assert len(results) == 5
    assert judge.requests == 5
    assert generator.calls == []
    assert stats.models["synth"].reused >= 3
    assert len(keys_count(config)) == 20


async def test_deleted_or_corrupt_image_is_generated_again(make_config: ConfigFactory) -> None:
    config = make_config(samples=4)
    first = await run_to_end(config)
    assert first[0].image is not None
    image = config.run_dir / first[0].image
    original = image.read_bytes()
    image.write_bytes(original[:40])  # truncated PNG
    path = config.run_dir / JOURNAL
    kept = [
        line
        for line in path.read_text().splitlines()
        if json.loads(line)["data_id"] != first[0].data_id
    ]
    path.write_text("\n".join(kept) + "\n")
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    results = await run_to_end(config, generators=[generator])
    assert len(results) == 2
    assert generator.calls == [1]
    assert image.read_bytes() == original  # same seed, same picture


async def test_torn_last_record_is_cut_off_and_asked_again(make_config: ConfigFactory) -> None:
    config = make_config(samples=5)
    await run_to_end(config)
    path = config.run_dir / JOURNAL
    data = path.read_bytes()
    path.write_bytes(data[:-30])  # a crash in the middle of the last line
    state = Journal(path).open()
    assert state.lines == 9
    assert state.torn_bytes > 0
    results = await run_to_end(config)
    assert len(results) == 1
    counts = keys_count(config)
    assert len(counts) == 10 and set(counts.values()) == {1}


async def test_a_whole_last_line_without_its_line_end_is_torn_and_asked_again(
    make_config: ConfigFactory,
) -> None:
    # A crash between a line's text and its "\n": the readers stop before such a line, so
    # the resume must not count it as judged (it would be in no report), but cut it off.
    config = make_config(samples=5)
    await run_to_end(config)
    path = config.run_dir / JOURNAL
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    last = json.loads(data.splitlines()[-1])
    assert len(list(read_journal(path))) == 9
    results = await run_to_end(config)  # nothing else left to do: that one is asked again
    assert [(j.data_id, j.dimension) for j in results] == [(last["data_id"], last["dimension"])]
    assert path.read_bytes().endswith(b"\n")
    counts = keys_count(config)
    assert len(counts) == 10 and set(counts.values()) == {1}
    assert len(list(read_journal(path))) == 10


async def test_lines_appended_after_an_unterminated_last_line_are_not_joined_to_it(
    make_config: ConfigFactory,
) -> None:
    config, path, lines = await finished_journal(make_config)
    path.write_bytes(b"".join(lines[:6])[:-1])  # 4 judgements left to ask, line 6 unterminated
    results = await run_to_end(config)
    assert len(results) == 5  # the 4 never asked, and the torn one
    counts = keys_count(config)  # every line parses: none garbled by a join
    assert len(counts) == 10 and set(counts.values()) == {1}
    assert len(list(read_journal(path))) == 10


async def test_a_damaged_line_mid_journal_is_skipped_not_cut_with_all_after_it(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    config, path, lines = await finished_journal(make_config)
    damaged = [*lines[:3], b"\x00" * 40 + b"\n", *lines[4:], b'{"schema_version":1,"mod']
    path.write_bytes(b"".join(damaged))  # line 4 damaged, and a torn tail after line 10
    state = Journal(path).open()
    assert (state.lines, state.skipped_lines, len(state)) == (10, [4], 9)
    assert path.read_bytes() == b"".join(damaged[:-1])  # only the torn tail was cut
    with caplog.at_level("WARNING", logger="trig_stream.journal"):
        assert len(list(read_journal(path))) == 9
    assert "1 line(s) are not judgements and were skipped (the first: line 4: Invalid JSON" in (
        caplog.text
    )
    results = await run_to_end(config)  # the damaged line's judgement is asked again
    assert [(j.data_id, j.dimension) for j in results] == [
        (json.loads(lines[3])["data_id"], json.loads(lines[3])["dimension"])
    ]
    counts = Counter(j.key for j in read_journal(path))  # the damaged line stays in place
    assert len(counts) == 10 and set(counts.values()) == {1}


async def test_a_whole_unreadable_last_line_is_kept_and_skipped_like_a_middle_one(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Its line end was written, so no crash tore it: a later format's line, or a hand edit.
    # Cut as a torn tail, it was deleted from the file, while the same line mid-journal stays.
    config, path, lines = await finished_journal(make_config)
    later = [line.replace(b'{"schema_version":1,', b'{"schema_version":2,') for line in lines]
    damaged = [*lines[:3], later[3], *lines[4:-1], later[-1]]
    path.write_bytes(b"".join(damaged))
    state = Journal(path).open()
    assert (state.lines, state.skipped_lines, state.torn_bytes, len(state)) == (10, [4, 10], 0, 8)
    assert path.read_bytes() == b"".join(damaged)
    with caplog.at_level("WARNING", logger="trig_stream.journal"):
        assert len(list(read_journal(path))) == 8
    # A later format's line is named so, not as a number out of range.
    assert (
        "2 line(s) are not judgements and were skipped (the first: line 4: schema_version: "
        "written by a later trig-stream (record format 2; this one reads formats up to 1): "
        "read it with that version)"
    ) in caplog.text
    results = await run_to_end(config)  # both asked again; both lines stay in place
    assert {(j.data_id, j.dimension) for j in results} == {
        (json.loads(line)["data_id"], json.loads(line)["dimension"])
        for line in (lines[3], lines[-1])
    }
    assert path.read_bytes().startswith(b"".join(damaged))


async def test_a_refused_resume_leaves_the_journal_as_it_was(make_config: ConfigFactory) -> None:
    # A run directory of a later trig-stream: every journal line is of a format this one
    # cannot read. The run is refused on its manifest, and must not cut a byte first.
    config = make_config(samples=5)
    await run_to_end(config)
    path, manifest = config.run_dir / JOURNAL, config.run_dir / MANIFEST
    later = path.read_bytes().replace(b'{"schema_version":1,', b'{"schema_version":2,')
    path.write_bytes(later + b'{"schema_version":2,"mod')  # a torn tail too
    later_manifest = {**json.loads(manifest.read_text()), "schema_version": MANIFEST_VERSION + 1}
    manifest.write_text(json.dumps(later_manifest, indent=2))
    before = {entry: entry.read_bytes() for entry in config.run_dir.rglob("*") if entry.is_file()}
    before.pop(config.run_dir / LOCK)
    with pytest.raises(RunDirError, match="written by a later trig-stream"):
        await run_to_end(config)
    after = {entry: entry.read_bytes() for entry in config.run_dir.rglob("*") if entry.is_file()}
    after.pop(config.run_dir / LOCK)
    assert after == before


async def test_a_refused_resume_leaves_no_journal_where_there_was_none(
    make_config: ConfigFactory,
) -> None:
    config = make_config(samples=2)
    await run_to_end(config)
    (config.run_dir / JOURNAL).unlink()  # images, a manifest, no journal
    changed = make_config(
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 32}}]
    )
    with pytest.raises(FingerprintMismatch, match="size 16 in the run dir, 32"):
        await run_to_end(changed)
    assert not (config.run_dir / JOURNAL).exists()


def edited(field: str, value: str) -> Callable[[dict[str, Any]], tuple[bytes, bytes]]:
    """What to replace in a journal line to set ``field`` to the JSON text ``value``."""
    return lambda record: (
        f'"{field}":{json.dumps(record[field])}'.encode(),
        f'"{field}":{value}'.encode(),
    )


async def judged_journal(make_config: ConfigFactory) -> tuple[RunConfig, Path]:
    """A finished run of 3 samples (6 judgements), and its journal."""
    config = make_config(samples=3)
    await run_to_end(config)
    return config, config.run_dir / JOURNAL


async def finished_journal(make_config: ConfigFactory) -> tuple[RunConfig, Path, list[bytes]]:
    """A finished run of 5 samples, its journal, and the journal's lines (with their ends)."""
    config = make_config(samples=5)
    await run_to_end(config)
    path = config.run_dir / JOURNAL
    return config, path, path.read_bytes().splitlines(keepends=True)


LINES_NO_JUDGEMENT_HOLDS = {
    "nan": edited("score", "NaN"),
    "text": edited("score", '"high"'),
    "number-as-text": edited("score", '"0.5"'),
    "true": edited("score", "true"),
    "null": edited("score", "null"),
    "overflow": edited("score", "1e999"),
    "negative-overflow": edited("score", "-1E400"),
    "huge-int": edited("score", "9" * 400),
    "above-one": edited("score", "1.5"),
    "negative": edited("score", "-0.25"),
    "pair-twice": edited("pair", '"IQ-R_IQ-R"'),
    "pair-unknown": edited("pair", '"XX_YY"'),
    "pair-without-it": edited("pair", '"R-T_R-B"'),
    # Damage inside a line that its start and end do not show (a disk fault, an edit):
    "byte-not-utf8": lambda record: (b'"judge":{', b'"judge":\xff{'),
    "json-broken": lambda record: (b'"top_logprobs":[[', b'"top_logprobs":[{'),
    "later-format": edited("schema_version", "2"),
    "format-zero": edited("schema_version", "0"),
    "format-text": edited("schema_version", '"1"'),
}


@pytest.mark.parametrize("edit", LINES_NO_JUDGEMENT_HOLDS.values(), ids=LINES_NO_JUDGEMENT_HOLDS)
async def test_an_ok_line_no_judgement_holds_is_asked_again(
    make_config: ConfigFactory, edit: Callable[[dict[str, Any]], tuple[bytes, bytes]]
) -> None:
    # A hand edit can leave what json reads but no judgement holds (a score that is no
    # number, a pair that is none or not its dimension's): the report skips such a line, so
    # resuming must not count it as judged, or its key would be in neither.
    config, path = await judged_journal(make_config)
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[2])
    assert record["status"] == "ok"
    old, new = edit(record)
    assert old in lines[2]
    lines[2] = lines[2].replace(old, new)
    path.write_bytes(b"".join(lines))
    state = Journal(path).open()
    assert (len(state), state.skipped_lines) == (5, [3])
    results = await run_to_end(config)
    assert [(j.data_id, j.dimension) for j in results] == [(record["data_id"], record["dimension"])]
    assert len(list(read_journal(path))) == 6


async def test_a_journal_with_windows_line_ends_resumes_asking_nothing(
    make_config: ConfigFactory,
) -> None:
    # An editor or a copy through another system can turn every line end into CRLF; the
    # report reads such lines, and so must the resume, not cut them all off as a torn tail.
    config, path = await judged_journal(make_config)
    crlf = path.read_bytes().replace(b"\n", b"\r\n")
    path.write_bytes(crlf)
    assert await run_to_end(config) == []
    assert path.read_bytes() == crlf


async def test_a_line_cut_short_and_joined_to_the_next_is_asked_again(
    make_config: ConfigFactory,
) -> None:
    config, path = await judged_journal(make_config)
    lines = path.read_bytes().splitlines(keepends=True)
    joined = {json.loads(line)["data_id"] + json.loads(line)["dimension"] for line in lines[2:4]}
    lines[2:4] = [lines[2][:200] + lines[3]]  # one line again, two starts, one end
    path.write_bytes(b"".join(lines))
    results = await run_to_end(config)
    assert {j.data_id + j.dimension for j in results} == joined
    counts = Counter(j.key for j in read_journal(path))
    assert len(counts) == 6 and set(counts.values()) == {1}


async def test_a_line_zeroed_in_the_middle_is_not_counted_as_judged(
    make_config: ConfigFactory,
) -> None:
    config, path = await judged_journal(make_config)
    lines = path.read_bytes().splitlines(keepends=True)
    middle = len(lines[2]) // 2
    lines[2] = lines[2][:middle] + b"\x00" * 16 + lines[2][middle + 16 :]  # start, end intact
    path.write_bytes(b"".join(lines))
    state = Journal(path).open()
    assert (len(state), state.skipped_lines) == (5, [3])
    results = await run_to_end(config)  # asked again, as read_journal skips it too
    assert len(results) == 1
    counts = Counter(j.key for j in read_journal(path))
    assert len(counts) == 6 and set(counts.values()) == {1}


async def test_retry_errors_asks_failed_judgements_again(make_config: ConfigFactory) -> None:
    failing = make_config(
        samples=10,
        judges=[{"name": "trigscore", "backend": "fake", "options": {"error_rate": 0.3}}],
    )
    await run_to_end(failing)
    errors = sum(1 for r in journal(failing) if r["status"] == "error")
    assert errors > 0
    assert await run_to_end(failing) == []  # failed ones stay failed without the flag
    # The same judge with its fault gone: only the failed keys are asked again.
    judge = FakeJudge(options=FakeJudgeOptions())
    results = await run_to_end(failing, judges=[judge], retry_errors=True)
    assert judge.requests == errors
    assert all(j.status == "ok" for j in results)
    latest = {(r["data_id"], r["dimension"]): r["status"] for r in journal(failing)}
    assert set(latest.values()) == {"ok"}


async def test_changed_settings_are_refused_unless_new_run(make_config: ConfigFactory) -> None:
    config = make_config(samples=3)
    await run_to_end(config)
    changed = make_config(
        samples=3,
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 32}}],
    )
    # The message names the field that changed, not the whole fingerprint.
    with pytest.raises(
        FingerprintMismatch, match="generator 'synth': size 16 in the run dir, 32 in"
    ):
        await run_to_end(changed)
    judged_otherwise = make_config(
        samples=3, judges=[{"name": "trigscore", "backend": "fake", "options": {"seed": 5}}]
    )
    with pytest.raises(FingerprintMismatch, match=r"'trigscore': params\.seed 0 in the run dir, 5"):
        await run_to_end(judged_otherwise)
    stored = Manifest(run_name="r", task="t2i", judges={"j": {"model": "m"}})
    configured = Manifest(run_name="r", task="t2i", judges={"j": {"model": "m", "v": [1]}})
    assert stored.differences(configured) == [
        "judge 'j': v not set in the run dir, [1] in the config"
    ]
    # A model renamed in case alone was taken for a new one: its folders are the other's on
    # a file system that ignores case.
    recased = make_config(
        samples=3,
        generators=[{"name": "Synth", "backend": "synthetic", "options": {"size": 16}}],
    )
    with pytest.raises(
        FingerprintMismatch,
        match=r"generator 'Synth': differs from 'synth', a model with results in the run dir, "
        r"only in case; a model's name names its folders",
    ):
        await run_to_end(recased)
    async with Engine(changed, new_run=True) as engine:
        results = [j async for j in engine.results]
    assert len(results) == 6
    assert engine.run_dir_path.name == "test-2"
    assert len(journal(config)) == 6  # the original run is untouched


async def test_a_rename_in_case_back_to_an_old_name_is_refused(make_config: ConfigFactory) -> None:
    # Only a name new to the run dir was checked: "Synth" (no results) renamed "synth" (which
    # made results) was accepted, and so, wrongly, was the way back to "Synth", whose folders
    # are synth's on a file system that ignores case.
    def models(name: str, **options: object) -> list[dict[str, object]]:
        return [
            {"name": name, "backend": "synthetic", "options": {"size": 16, **options}},
            {"name": "other", "backend": "synthetic", "options": {"size": 16}},
        ]

    await run_to_end(make_config(samples=2, generators=models("Synth", failure_rate=1.0)))
    renamed = make_config(samples=2, generators=models("synth"))
    assert any(j.status == "ok" for j in await run_to_end(renamed))
    back = make_config(samples=2, generators=models("Synth", failure_rate=1.0))
    with pytest.raises(
        FingerprintMismatch,
        match=r"generator 'Synth': differs from 'synth', a model with results in the run dir, "
        r"only in case",
    ):
        await run_to_end(back)


async def test_a_journal_of_another_judge_copied_in_is_refused_not_mixed(
    make_config: ConfigFactory,
) -> None:
    # The config matches the manifest; the journal's lines were judged with another seed
    # (another run's journal copied over this one's): resuming judged the rest with seed 5,
    # and the report mixed both in one metric.
    config = make_config(
        samples=4, judges=[{"name": "trigscore", "backend": "fake", "options": {"seed": 5}}]
    )
    await run_to_end(config)
    path = config.run_dir / JOURNAL
    lines = path.read_bytes().splitlines(keepends=True)
    other = [line.replace(b'"seed":5}', b'"seed":0}') for line in lines[:4]]
    assert other != lines[:4]
    path.write_bytes(b"".join(other))
    with pytest.raises(FingerprintMismatch) as refused:
        await run_to_end(config)
    message = str(refused.value)
    assert "holds results its manifest.json does not describe" in message
    assert "judge 'trigscore': params.seed 0 in the journal, 5 in manifest.json" in message
    assert "--new-run" in message
    assert path.read_bytes() == b"".join(other)


async def test_one_line_of_another_judge_after_the_run_s_own_is_refused_not_mixed(
    make_config: ConfigFactory,
) -> None:
    # The first line holds the manifest's fingerprint: the other one, at the end, is a
    # second fingerprint of the same metric, and must be seen there too.
    config = make_config(samples=4)
    await run_to_end(config)
    path = config.run_dir / JOURNAL
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[0])
    other = {**record, "judge": {**record["judge"], "params": {"seed": 5}}}
    assert other["judge"] != record["judge"] and other["metric"] == record["metric"]
    path.write_bytes(b"".join(lines) + json.dumps(other).encode() + b"\n")
    with pytest.raises(FingerprintMismatch) as refused:
        await run_to_end(config)
    message = str(refused.value)
    assert f"holds results its {MANIFEST} does not describe" in message
    assert f"judge 'trigscore': params.seed 5 in the journal, 0 in {MANIFEST}" in message


@pytest.mark.parametrize("where", ["at the end", "first"])
async def test_a_line_of_a_run_with_another_seed_is_refused_not_mixed(
    make_config: ConfigFactory, where: str
) -> None:
    # A line of another run (same settings but [run] seed) appended to this journal was
    # taken as this run's: 0 asked, and the report gave the other run's score for an image
    # made with another seed. Each line records its seed, derived from the run's.
    config = make_config(samples=3)
    other = make_config(samples=3, run={"name": "other", "seed": 43})
    await run_to_end(config)
    await run_to_end(other)
    path = config.run_dir / JOURNAL
    lines = path.read_bytes().splitlines(keepends=True)
    data_id = json.loads(lines[-1])["data_id"]
    foreign = [
        line
        for line in (other.run_dir / JOURNAL).read_bytes().splitlines(keepends=True)
        if json.loads(line)["data_id"] == data_id
    ]
    assert foreign and all(
        json.loads(line)["seed"] != json.loads(lines[-1])["seed"] for line in foreign
    )
    edited = b"".join(lines + foreign) if where == "at the end" else b"".join(foreign + lines)
    path.write_bytes(edited)
    with pytest.raises(FingerprintMismatch) as checked:
        check_resume(config.run_dir, Manifest(run_name=config.run.name, task="t2i"))
    with pytest.raises(FingerprintMismatch) as refused:
        await run_to_end(config)
    for message in (str(checked.value), str(refused.value)):
        assert f"holds results its {MANIFEST} does not describe" in message
        assert f"model 'synth', data_id {data_id!r}: " in message
        assert "gives" in message and "another seed" in message and "--new-run" in message
    if where == "at the end":
        assert f"line {len(lines) + 1} of the journal records seed" in str(refused.value)
    assert path.read_bytes() == edited


async def test_results_of_a_model_or_judge_the_manifest_lacks_are_refused(
    make_config: ConfigFactory,
) -> None:
    config = make_config(samples=2)
    await run_to_end(config)
    manifest = config.run_dir / MANIFEST
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "generators": {}, "judges": {}}))
    with pytest.raises(FingerprintMismatch) as refused:
        await run_to_end(config)
    assert str(refused.value).splitlines()[1:3] == [
        "  model 'synth': has results in the journal but no entry in manifest.json",
        "  judge 'trigscore': has results in the journal but no entry in manifest.json",
    ]
    assert len(journal(config)) == 4


def test_journal_lines_of_a_path_that_moved_or_an_older_auto_dtype_are_the_same_judge() -> None:
    # A moved project's manifest entry takes the judge's path at its new place, while the
    # lines keep the old; lines older than the dtype on its device say "auto".

    def line(model: str, dtype: str) -> JudgeFingerprint:
        return JudgeFingerprint(backend="transformers", model=model, params={"dtype": dtype})

    entry = line("/new/proj/judge-vl", "float32").model_dump(mode="json")
    manifest = Manifest(run_name="r", task="t2i", judges={"j": entry})

    assert manifest.journal_differences([], {"j": [line("/old/proj/judge-vl", "auto")]}) == []
    assert manifest.journal_differences([], {"j": [line("/old/proj/other-vl", "float32")]}) == [
        'judge \'j\': model "/old/proj/other-vl" in the journal, "/new/proj/judge-vl" in '
        "manifest.json"
    ]


def test_a_new_run_whose_name_would_be_too_long_is_refused(tmp_path: Path) -> None:
    # A 128-character name became "<name>-2", which the resume hint told to set as [run]
    # name, and which the config then refused: the run could be resumed only by hand.
    taken = tmp_path / ("r" * 127)
    taken.mkdir()
    with pytest.raises(RunDirError, match=r"a run name of 129 characters, .* shorten \[run\] name"):
        next_free_run_dir(taken)
    short = tmp_path / "short"
    short.mkdir()
    assert next_free_run_dir(short) == tmp_path / "short-2"


def test_a_new_run_directory_is_claimed_when_chosen(tmp_path: Path) -> None:
    # It was only looked at: two runs choosing at once both got "r-2", and the second
    # failed with RunLockedError once the first had opened it.
    (tmp_path / "r").mkdir()
    first = next_free_run_dir(tmp_path / "r")
    second = next_free_run_dir(tmp_path / "r")
    assert (first.name, second.name) == ("r-2", "r-3")
    assert first.is_dir() and second.is_dir()


async def test_two_new_runs_started_together_each_get_a_directory(
    make_config: ConfigFactory,
) -> None:
    config = make_config(samples=3)
    await run_to_end(config)
    # It failed one of them: RunLockedError, "test-2 is in use by another run".
    engines = [Engine(config, new_run=True) for _ in range(2)]

    async def run(engine: Engine) -> None:
        async with engine:
            await engine.drain()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for engine in engines:
                tg.start_soon(run, engine)
    assert sorted(engine.run_dir_path.name for engine in engines) == ["test-2", "test-3"]
    assert [engine.summary().judged for engine in engines] == [6, 6]


async def test_results_without_their_manifest_are_refused_not_mixed(
    make_config: ConfigFactory,
) -> None:
    config = make_config(samples=2)
    await run_to_end(config)
    (config.run_dir / MANIFEST).unlink()
    changed = make_config(samples=2, run={"seed": 7})
    with pytest.raises(RunDirError, match=r"holds results but no manifest\.json"):
        await run_to_end(changed)
    assert not (config.run_dir / MANIFEST).exists()
    assert len(list(read_journal(config.run_dir / JOURNAL))) == 4


async def test_a_run_that_made_only_errors_takes_its_corrected_settings(
    make_config: ConfigFactory,
) -> None:
    # Every generate call failed (a wrong option): the errors judged nothing, and the
    # corrected config was refused as "other settings".
    config = make_config(
        samples=3,
        generators=[
            {"name": "synth", "backend": "synthetic", "options": {"size": 16, "failure_rate": 1}}
        ],
    )
    assert {j.status for j in await run_to_end(config)} == {"error"}
    corrected = make_config(
        samples=3,
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 32}}],
    )
    results = await run_to_end(corrected, retry_errors=True)
    assert [j.status for j in results] == ["ok"] * 6
    assert read_manifest(config.run_dir).generators["synth"]["size"] == 32


async def test_a_run_that_made_nothing_takes_its_corrected_settings(
    make_config: ConfigFactory,
) -> None:
    class Unloadable(SyntheticGenerator):
        def load(self) -> None:
            raise OSError("no such checkpoint")

    config = make_config(samples=3)
    with pytest.raises(FatalBackendError, match="no such checkpoint"):
        async with Engine(config, generators=[Unloadable("synth", SyntheticOptions())]) as engine:
            await engine.drain()
    corrected = make_config(
        samples=3,
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 32}}],
    )
    assert len(await run_to_end(corrected)) == 6  # not refused: nothing was made before
    assert read_manifest(config.run_dir).generators["synth"]["size"] == 32


async def test_an_entry_that_made_nothing_takes_its_corrected_settings_beside_others(
    make_config: ConfigFactory,
) -> None:
    # A second judge whose every request failed (its model name was wrong) and a second
    # generator that failed every call: the first judge's and generator's results made the
    # whole directory refuse their corrections as "other settings".
    good = {"name": "synth", "backend": "synthetic", "options": {"size": 16}}
    failing = {"name": "other", "backend": "synthetic", "options": {"size": 16, "failure_rate": 1}}
    judges = [
        {"name": "trigscore", "backend": "fake"},
        {"name": "vlm", "backend": "fake", "options": {"error_rate": 1}},
    ]
    config = make_config(samples=3, generators=[good, failing], judges=judges)
    first = await run_to_end(config)
    assert {(j.model, j.metric, j.status) for j in first} == {
        ("synth", "trigscore", "ok"),
        ("synth", "vlm", "error"),
        ("other", "trigscore", "error"),
        ("other", "vlm", "error"),
    }
    fixed = [judges[0], {"name": "vlm", "backend": "fake", "options": {"seed": 1}}]
    corrected = make_config(
        samples=3,
        generators=[good, {**failing, "options": {"size": 32}}],
        judges=fixed,
    )
    results = await run_to_end(corrected, retry_errors=True)
    assert {j.status for j in results} == {"ok"} and len(results) == 18  # the errors, again
    manifest = read_manifest(config.run_dir)
    assert manifest.generators["other"]["size"] == 32
    assert manifest.judges["vlm"]["params"] == {"scoring_rules": SCORING_RULES, "seed": 1}
    # The entries that made results keep their settings.
    for changed in (
        make_config(samples=3, generators=[{**good, "options": {"size": 32}}], judges=fixed),
        make_config(
            samples=3,
            generators=[good],
            judges=[{"name": "trigscore", "backend": "fake", "options": {"seed": 2}}],
        ),
    ):
        with pytest.raises(FingerprintMismatch, match="holds results made with other settings"):
            await run_to_end(changed)


class TupleFingerprint(SyntheticGenerator):
    """A generator whose fingerprint holds what JSON does not: a tuple, a set, a path."""

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "size": (64, 64), "tags": {"b", "a"}, "at": Path("x")}


async def test_a_fingerprint_of_tuples_and_sets_resumes(make_config: ConfigFactory) -> None:
    # The stored manifest holds [64, 64], the config's fingerprint (64, 64): every resume of
    # a diffusers run with source_size (every hqedit run) was refused as "other settings".
    config = make_config(samples=2)
    first = [TupleFingerprint("synth", SyntheticOptions(size=16))]
    assert len(await run_to_end(config, generators=first)) == 4
    again = [TupleFingerprint("synth", SyntheticOptions(size=16))]
    assert await run_to_end(config, generators=again) == []
    stored = read_manifest(config.run_dir).generators["synth"]
    assert (stored["size"], stored["tags"], stored["at"]) == ([64, 64], ["a", "b"], "x")


async def test_a_fingerprint_json_cannot_hold_is_one_error_naming_the_generator(
    make_config: ConfigFactory,
) -> None:
    class Opaque(SyntheticGenerator):
        def fingerprint(self) -> dict[str, Any]:
            return {**super().fingerprint(), "model": object()}

    with pytest.raises(
        FatalBackendError, match="fingerprint of generator 'synth' holds a value of type object"
    ):
        await run_to_end(make_config(samples=2), generators=[Opaque("synth", SyntheticOptions())])


def test_a_value_json_cannot_hold_is_named_in_a_whole_sentence() -> None:
    with pytest.raises(
        FatalBackendError, match=r"^the fingerprint holds nan, which JSON cannot hold$"
    ):
        as_json({"scale": [float("nan")]}, "the fingerprint")
    with pytest.raises(FatalBackendError, match=r"type object, which JSON cannot hold: <object"):
        as_json(object(), "the fingerprint")


def test_the_hqedit_fingerprint_is_stored_as_it_is_read_back(tmp_path: Path) -> None:
    from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
    from trig_stream.backends.generators.diffusers_options import DiffusersOptions
    from trig_stream.preflight import run_manifest

    options = DiffusersOptions(preset="hqedit", checkpoint=str(tmp_path))
    generator = DiffusersGenerator("edit", options)
    assert isinstance(generator.fingerprint()["source_size"], tuple)
    config = RunConfig.model_validate(
        {
            "run": {"name": "r", "task": "p2p", "output_dir": str(tmp_path)},
            "dataset": {"path": str(tmp_path / "p.json")},
            "generators": [{"name": "edit", "backend": "image_folder", "options": {"path": "."}}],
            "judges": [{"name": "trigscore", "backend": "fake"}],
        }
    )
    manifest = run_manifest(config, [generator], {})
    assert manifest.generators == json.loads(manifest.model_dump_json())["generators"]


def test_an_image_alone_keeps_the_settings_it_was_made_with(tmp_path: Path) -> None:
    first = Manifest(run_name="r", task="t2i", generators={"g": {"size": 16}})
    second = Manifest(run_name="r", task="t2i", generators={"g": {"size": 32}})
    run, _ = store.RunDir.open(tmp_path, first)
    run.close()
    run, _ = store.RunDir.open(tmp_path, second)  # an empty run directory: taken
    image = run.image_path("t2i", "g", "IQ-R_TA-C_1")
    run.close()
    assert read_manifest(tmp_path).generators == second.generators
    image.parent.mkdir(parents=True)
    image.write_bytes(b"made with size 32")
    with pytest.raises(FingerprintMismatch, match="size"):
        store.RunDir.open(tmp_path, first)


def test_a_journal_of_only_unreadable_lines_holds_results(tmp_path: Path) -> None:
    # Whatever an unreadable line held may have been a judgement of the stored settings:
    # the directory is not taken as empty, for other settings or without its manifest.
    first = Manifest(run_name="r", task="t2i", judges={"j": {"backend": "fake", "seed": 0}})
    second = Manifest(run_name="r", task="t2i", judges={"j": {"backend": "fake", "seed": 5}})
    run, _ = store.RunDir.open(tmp_path, first)
    run.close()
    (tmp_path / JOURNAL).write_bytes(b"a line no judgement holds\n")
    with pytest.raises(FingerprintMismatch, match="seed"):
        store.RunDir.open(tmp_path, second)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(RunDirError, match=f"holds results but no {MANIFEST}"):
        store.RunDir.open(tmp_path, first)
    assert (tmp_path / JOURNAL).read_bytes() == b"a line no judgement holds\n"


def write_project(root: Path, shared_images: Path) -> Path:
    """A project folder: a config in ``config/`` naming, relative to it, the dataset, an
    image folder and ``runs/``, and another image folder outside it (``shared_images``)."""
    root.mkdir()
    prompts = write_prompts(root / "prompts.json", 4)
    for folder in (root / "images", shared_images):
        folder.mkdir(parents=True, exist_ok=True)
        for record in json.loads(prompts.read_text()):
            Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / f"{record['data_id']}.png")
    config = root / "config" / "run.toml"
    config.parent.mkdir()
    config.write_text(
        f"""
[run]
name = "moved"
output_dir = "../runs"

[dataset]
path = "../prompts.json"

[[generators]]
name = "mine"
backend = "image_folder"
options = {{ path = "../images" }}

[[generators]]
name = "shared"
backend = "image_folder"
options = {{ path = "{shared_images}" }}

[[judges]]
backend = "fake"
"""
    )
    return config


async def test_a_project_folder_moved_whole_resumes_where_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `mv proj proj2` (config, dataset, image folder and runs/ together): the manifest's
    # absolute image folder path made the moved config "other settings", and the
    # interrupted run could not resume.
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_OK

    shared = tmp_path / "shared-images"
    first = load_config(write_project(tmp_path / "proj", shared))
    assert len(await run_to_end(first)) == 16
    path = first.run_dir / JOURNAL
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:5]))  # interrupted
    (tmp_path / "proj").rename(tmp_path / "proj2")
    config_file = tmp_path / "proj2" / "config" / "run.toml"
    assert main(["validate", str(config_file)]) == EXIT_OK
    # A folder that is really another one is still refused, as is a path outside the
    # folder that moved which now names another.
    text = config_file.read_text()
    (tmp_path / "proj2" / "other-images").mkdir()
    for old, new in (('"../images"', '"../other-images"'), (str(shared), str(tmp_path))):
        config_file.write_text(text.replace(old, new))
        with pytest.raises(FingerprintMismatch) as refused:
            await run_to_end(load_config(config_file))
        message = str(refused.value)
        assert "path " in message and "has moved since" in message
        assert (
            f"a path in {tmp_path / 'proj'} that is gone from there is compared at its place in"
            in message
        )
    config_file.write_text(text)
    moved = load_config(config_file)
    results = await run_to_end(moved)
    assert len(results) == 11  # what the first run had not written, and nothing else
    assert len(keys_count(moved)) == 16 and set(keys_count(moved).values()) == {1}
    stored = read_manifest(moved.run_dir).generators
    assert stored["mine"]["path"] == str(tmp_path / "proj2" / "images")
    assert stored["shared"]["path"] == str(shared)
    capsys.readouterr()


async def test_a_folder_left_behind_by_a_move_is_not_taken_for_one_beside_the_new_place(
    tmp_path: Path,
) -> None:
    # A/proj names an image folder outside it ("../../shared": A/shared) and moves to
    # B/proj: the runs' shared end is proj/runs/<name>, so A -> B looked moved and every
    # stored path under A, A/shared included, was compared at B: B/shared, another folder
    # that stayed where it was, resumed the run with mixed scores. A path still at its old
    # place did not move.
    (tmp_path / "A").mkdir()
    first_file = write_project(tmp_path / "A" / "proj", tmp_path / "A" / "shared")
    first_file.write_text(first_file.read_text().replace(str(tmp_path / "A"), "../.."))
    first = load_config(first_file)
    assert first.generators[1].options["path"] == str(tmp_path / "A" / "shared")
    assert len(await run_to_end(first)) == 16
    (tmp_path / "B").mkdir()
    (tmp_path / "A" / "proj").rename(tmp_path / "B" / "proj")
    write_project(tmp_path / "C", tmp_path / "B" / "shared")  # another folder of images
    with pytest.raises(FingerprintMismatch) as refused:
        await run_to_end(load_config(tmp_path / "B" / "proj" / "config" / "run.toml"))
    assert f"generator 'shared': path \"{tmp_path / 'A' / 'shared'}\" in the run dir" in str(
        refused.value
    )
    # Gone from its old place, it moved with the project: the run resumes.
    (tmp_path / "A" / "shared").rename(tmp_path / "A" / "gone")
    assert await run_to_end(load_config(tmp_path / "B" / "proj" / "config" / "run.toml")) == []


def test_a_model_left_out_after_a_move_keeps_the_paths_that_did_not_move(tmp_path: Path) -> None:
    # A model of the run directory that the config of the run after the move leaves out:
    # its paths that moved with the folder are taken to their new place (so that putting
    # it back later resumes); a path left behind, or gone from both places, stays.
    old, new = tmp_path / "proj", tmp_path / "proj2"
    (new / "models" / "moved").mkdir(parents=True)
    (old / "models" / "left").mkdir(parents=True)
    stored = Manifest(
        run_name="r",
        task="t2i",
        config={"run": {"output_dir": str(old / "runs")}},
        generators={
            "out": {
                "checkpoint": str(old / "models" / "moved"),
                "others": [str(old / "models" / "left"), str(old / "models" / "nowhere")],
                "name": "proj",
            }
        },
    )
    moved = Move.between(old / "runs", new / "runs")
    assert moved is not None and moved.roots == ((old, new),)
    merged = stored.merged(Manifest(run_name="r", task="t2i"), moved)
    assert merged.generators["out"] == {
        "checkpoint": str(new / "models" / "moved"),
        "others": [str(old / "models" / "left"), str(old / "models" / "nowhere")],
        "name": "proj",
    }
    assert Move.between(old / "runs", old / "runs") is None
    # Only what the paths share at their end stayed: /a/x/runs -> /b/runs moved /a/x to /b.
    assert Move.between(Path("/a/x/runs"), Path("/b/runs")) == Move(
        ((PurePath("/a/x"), PurePath("/b")),)
    )


async def test_adding_a_model_resumes_the_same_run(make_config: ConfigFactory) -> None:
    config = make_config(samples=3)
    await run_to_end(config)
    more = make_config(
        samples=3,
        generators=[
            {"name": "synth", "backend": "synthetic", "options": {"size": 16}},
            {"name": "other", "backend": "synthetic", "options": {"size": 16}},
        ],
    )
    results = await run_to_end(more)
    assert {j.model for j in results} == {"other"}


async def test_a_sample_edited_since_it_was_judged_is_quarantined_not_mixed(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(samples=4)
    await run_to_end(config)
    before = (config.run_dir / JOURNAL).read_bytes()
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    edited = records[1]["data_id"]
    records[1]["prompt"] = "another prompt"  # the first judgements answered the old one
    prompts.write_text(json.dumps(records))
    more = make_config(samples=4, generators=[*SYNTH_AND_OTHER])
    async with Engine(more) as engine:
        results = [j async for j in engine.results]
        summary = await engine.drain()
    assert {j.model for j in results} == {"other"}
    assert {j.data_id for j in results} == {r["data_id"] for r in records} - {edited}
    assert summary.quarantined == 1
    quarantined = [json.loads(line) for line in (config.run_dir / "quarantine.jsonl").open()]
    assert [q["data_id"] for q in quarantined] == [edited]
    assert "changed since it was judged" in quarantined[0]["reason"]
    assert "--new-run" in quarantined[0]["reason"]
    assert (config.run_dir / JOURNAL).read_bytes().startswith(before)  # nothing lost


async def test_a_sample_is_compared_with_what_its_latest_judgements_asked(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # The last line of a key wins (the report reads it): when a sample's lines record two
    # versions (a journal whose later lines judged the edited record, copied in from the
    # --new-run that judged it), the resume compares the record with the later one.
    config = make_config(samples=4)
    await run_to_end(config)
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    edited = records[1]["data_id"]
    records[1]["prompt"] = "another prompt"
    prompts.write_text(json.dumps(records))
    fresh = make_config(samples=4, run={"name": "fresh"})
    judged_again = [j for j in await run_to_end(fresh) if j.data_id == edited]
    path = config.run_dir / JOURNAL
    old = {j.sample_digest for j in read_journal(path) if j.data_id == edited}
    new = {j.sample_digest for j in judged_again}
    assert len(old) == len(new) == 1 and old != new
    with path.open("ab") as journal_file:
        journal_file.write(b"".join(j.model_dump_json().encode() + b"\n" for j in judged_again))
    assert Journal(path).open().digests[edited] == new.pop()
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
        summary = await engine.drain()
    assert (results, summary.quarantined) == ([], 0)  # the record asks what was judged last
    records[1]["prompt"] = "prompt number 1"  # the first version, which the lines before asked
    prompts.write_text(json.dumps(records))
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
        summary = await engine.drain()
    assert (results, summary.quarantined) == ([], 1)


class GatedGenerator(SyntheticGenerator):
    """The synthetic generator, whose calls wait until ``gate`` is set; ``called`` says one
    began."""

    def __init__(self, name: str) -> None:
        super().__init__(name, SyntheticOptions(size=16))
        self.called = threading.Event()
        self.gate = threading.Event()

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Image.Image | Exception]:
        self.called.set()
        assert self.gate.wait(timeout=60)  # a safety net: the test sets it at once
        return super().generate(requests, worker=worker, cancel=cancel)


class WaitsOutARateLimit(SyntheticGenerator):
    """A generator whose calls wait as an API generator's do on a 429 with a long Retry-After
    (``call_with_retries``): until the run's cancel event fires, then ``cancelled``."""

    def __init__(self, name: str) -> None:
        super().__init__(name, SyntheticOptions(size=16))
        self.called = threading.Event()
        self.cancel: threading.Event | None = None

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Image.Image | Exception]:
        self.cancel = cancel
        self.called.set()
        assert cancel.wait(timeout=60)  # a safety net: the test cancels the run at once
        return [ItemError("cancelled") for _ in requests]


async def test_a_call_a_hard_stop_ends_is_asked_again_on_resume(
    make_config: ConfigFactory,
) -> None:
    # What the README promises of a graceful stop with an API generator's call in flight: it
    # waits for the call; a hard stop ends the wait, and the image, not failed, is asked
    # again when the run resumes.
    config = make_config(samples=1)
    waiting = WaitsOutARateLimit("synth")
    with anyio.fail_after(60):  # a safety net: nothing here waits on time
        async with Engine(config, generators=[waiting]) as engine:
            await anyio.to_thread.run_sync(waiting.called.wait, 60)
            engine.stop()
            assert waiting.cancel is not None and not waiting.cancel.is_set()
            engine.cancel()
            results = [j async for j in engine.results]
    assert results == [] and engine.stats().state == "cancelled"
    assert journal(config) == []  # no "generate failed: cancelled" error judgement
    again = await run_to_end(config)
    assert [j.status for j in again] == ["ok", "ok"]


async def test_a_resume_stopped_before_reading_the_dataset_through_keeps_the_quarantine_list(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # The list was wiped when a run opened: a resume stopped early (Ctrl-C, a fatal
    # generator) left none of the records refused further on, and status said nothing.
    prompts = tmp_path / "prompts.json"
    records = json.loads(write_prompts(prompts, 120).read_text())
    records[-1]["prompt"] = ""
    prompts.write_text(json.dumps(records))
    config = make_config(engine={"sample_buffer": 1, "image_buffer": 1})
    await run_to_end(config)
    listed = (config.run_dir / QUARANTINE).read_bytes()
    assert json.loads(listed)["data_id"] == records[-1]["data_id"]
    # A second model: every sample is work again, so reading stays a few samples ahead of
    # its generator, which holds its first call until the run is told to stop.
    other = GatedGenerator("other")
    more = make_config(
        generators=[*SYNTH_AND_OTHER], engine={"sample_buffer": 1, "image_buffer": 1}
    )
    async with Engine(
        more, generators=[SyntheticGenerator("synth", SyntheticOptions(size=16)), other]
    ) as engine:
        await anyio.to_thread.run_sync(other.called.wait, 60)
        engine.stop()
        other.gate.set()
        summary = await engine.drain()
    assert summary.quarantined == 0  # it stopped long before the last record
    assert (config.run_dir / QUARANTINE).read_bytes() == listed
    assert not (config.run_dir / QUARANTINE_PARTIAL).exists()
    # Read through, the run's own list replaces the old one.
    records[-1]["prompt"] = "fixed"
    prompts.write_text(json.dumps(records))
    await run_to_end(more)
    assert (config.run_dir / QUARANTINE).read_bytes() == b""
    assert not (config.run_dir / QUARANTINE_PARTIAL).exists()


async def test_an_image_left_without_judgements_is_reused_only_for_its_own_sample(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """A crash can leave an image written and not yet judged; if its record is edited
    before the resume, the image shows the old prompt and must be made again."""
    config = make_config(samples=4)
    first = await run_to_end(config)
    edited, kept = first[0].data_id, first[-1].data_id
    path = config.run_dir / JOURNAL
    lines = [
        line
        for line in path.read_text().splitlines()
        if json.loads(line)["data_id"] not in (edited, kept)
    ]
    path.write_text("\n".join(lines) + "\n")  # both images stay, their judgements are gone
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    for record in records:
        if record["data_id"] == edited:
            record["prompt"] = "another prompt"
    prompts.write_text(json.dumps(records))
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    results = await run_to_end(config, generators=[generator])
    assert generator.calls == [1]  # the edited one; the other image is reused
    assert {j.data_id for j in results} == {edited, kept}
    made = next(j for j in results if j.data_id == edited)
    assert made.image is not None
    with Image.open(config.run_dir / made.image) as image:
        assert image.info[SAMPLE_KEY] == f"{made.sample_digest} synth {edited} {made.seed}"


async def test_an_image_copied_from_another_sample_is_not_reused(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # Two samples may share a prompt and pair (their digests are then equal): an image
    # copied by hand from one to the other, or from another model's folder, was judged as
    # if it had been made for it, with its seed recorded but not used.
    prompts = tmp_path / "prompts.json"
    config = make_config(samples=2)
    records = json.loads(prompts.read_text())
    records[1]["prompt"] = records[0]["prompt"]
    prompts.write_text(json.dumps(records))
    first = await run_to_end(config)
    images = {j.data_id: config.run_dir / j.image for j in first if j.image}
    (_, one_image), (other, other_image) = sorted(images.items())
    path = config.run_dir / JOURNAL
    path.write_text(
        "".join(line + "\n" for line in path.read_text().splitlines() if other not in line)
    )
    other_image.write_bytes(one_image.read_bytes())
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    results = await run_to_end(config, generators=[generator])
    assert generator.calls == [1]  # made again, for its own seed
    assert {j.data_id for j in results} == {other}
    with Image.open(other_image) as image, Image.open(one_image) as copied_from:
        assert image.tobytes() != copied_from.tobytes()
        assert image.info[SAMPLE_KEY].split(" ")[1:] == ["synth", other, str(results[0].seed)]


@pytest.mark.parametrize("picture", ["another sample's, re-saved", "solid red"])
async def test_an_image_without_its_sample_chunk_is_not_reused(
    make_config: ConfigFactory, picture: str
) -> None:
    # Every image a run writes names what it was made for; one that names nothing (another
    # sample's image re-saved by an editor, which drops the chunk, or any picture put there
    # by hand) was judged as this sample's on its pixels alone.
    config = make_config(samples=2)
    first = await run_to_end(config)
    images = {j.data_id: config.run_dir / j.image for j in first if j.image}
    (_, one_image), (other, other_image) = sorted(images.items())
    path = config.run_dir / JOURNAL
    path.write_text(
        "".join(line + "\n" for line in path.read_text().splitlines() if other not in line)
    )
    if picture == "solid red":
        Image.new("RGB", (16, 16), (255, 0, 0)).save(other_image)
    else:
        with Image.open(one_image) as source:
            source.save(other_image)
    with Image.open(other_image) as image:
        assert SAMPLE_KEY not in image.info
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    results = await run_to_end(config, generators=[generator])
    assert generator.calls == [1]  # made again, for its own sample
    assert {j.data_id for j in results} == {other}
    with Image.open(other_image) as image:
        assert image.info[SAMPLE_KEY].split(" ")[1:] == ["synth", other, str(results[0].seed)]


async def test_an_image_of_a_run_before_labels_is_reused(make_config: ConfigFactory) -> None:
    # Its label is its sample's digest alone: resuming such a run makes no image again.
    config = make_config(samples=3)
    first = await run_to_end(config)
    for judgement in first:
        assert judgement.image is not None and judgement.sample_digest is not None
        path = config.run_dir / judgement.image
        with Image.open(path) as image:
            pixels = image.copy()
        path.write_bytes(with_sample_digest(encode_png(pixels), judgement.sample_digest))
    (config.run_dir / JOURNAL).write_text("")
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    results = await run_to_end(config, generators=[generator])
    assert generator.calls == [] and len(results) == len(first)


def digest_record(status: Status, data_id: str) -> Judgement:
    """A journal record of ``data_id`` with the sample digest ``0123456789abcdef``."""
    return Judgement(
        model="m",
        data_id=data_id,
        task="t2i",
        pair="IQ-R_IQ-O",
        dimension="IQ-R",
        metric="trigscore",
        status=status,
        sample_digest="0123456789abcdef",
        judge={"backend": "fake", "model": "fake"},
        score=0.5 if status == "ok" else None,
        error=None if status == "ok" else "boom",
    )


def test_error_judgements_record_no_digest_to_compare(tmp_path: Path) -> None:
    """A sample whose every judgement failed was never judged: editing it is no conflict."""

    def line(status: Status, data_id: str) -> bytes:
        return digest_record(status, data_id).model_dump_json().encode() + b"\n"

    path = tmp_path / JOURNAL
    path.write_bytes(line("error", "IQ-R_IQ-O_1") + line("ok", "IQ-R_IQ-O_2"))
    assert Journal(path).open().digests == {"IQ-R_IQ-O_2": "0123456789abcdef"}


def without_sample_digests(path: Path) -> None:
    """Write the journal at ``path`` again as a trig-stream older than sample digests wrote
    it (before eb40369): its lines record no ``sample_digest``."""
    old = [
        {k: v for k, v in json.loads(line).items() if k != "sample_digest"} for line in path.open()
    ]
    path.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in old))


async def test_journals_without_sample_digests_resume_as_before(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(samples=4)
    first = await run_to_end(config)
    assert all(j.sample_digest for j in first)
    without_sample_digests(config.run_dir / JOURNAL)
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    records[0]["prompt"] = "another prompt"  # an old journal cannot tell: nothing to compare
    prompts.write_text(json.dumps(records))
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
        summary = await engine.drain()
    assert (results, summary.quarantined) == ([], 0)


async def test_a_pair_edited_since_a_judgement_without_digest_is_quarantined(
    make_config: ConfigFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A line older than sample digests still records its pair: a record whose pair changed
    # was judged on the new pair's dimension beside the old pair's judgements (two versions
    # of one sample in one run).
    config = make_config(samples=4)
    await run_to_end(config)
    path = config.run_dir / JOURNAL
    without_sample_digests(path)
    before = path.read_bytes()
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    edited = records[1]["data_id"]
    records[1]["dimension"] = [records[1]["dimension"][0], "R-T"]
    prompts.write_text(json.dumps(records))
    said = (
        f"{path}: 4 sample(s) were judged only by a trig-stream older than sample digests "
        "(before eb40369), whose judgements record their pair alone: an edit of such a "
        "sample's prompt, item or img_id since cannot be detected"
    )
    with caplog.at_level("WARNING", logger="trig_stream.journal"):
        check_resume(config.run_dir, read_manifest(config.run_dir))  # validate
    assert caplog.text.count(said) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="trig_stream.journal"):
        async with Engine(config) as engine:
            results = [j async for j in engine.results]
            summary = await engine.drain()
    assert caplog.text.count(said) == 1
    assert (results, summary.quarantined) == ([], 1)
    quarantined = [json.loads(line) for line in (config.run_dir / QUARANTINE).open()]
    assert [q["data_id"] for q in quarantined] == [edited]
    assert (
        f"data_id {edited!r} changed since it was judged in this run directory (its pair "
        "differs: IQ-A_TA-S when judged, IQ-A_R-T now)"
    ) in quarantined[0]["reason"]
    assert path.read_bytes() == before


async def test_earlier_judgements_load_only_once_the_first_new_one_is_durable(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading 100k earlier judgements competes for the interpreter: it waits, so that a
    resume reaches its first new request first."""
    await run_to_end(make_config(samples=40))
    more = make_config(samples=40, generators=[*SYNTH_AND_OTHER])
    events: list[str] = []
    append = Journal.append

    def appended(journal: Journal, judgements: Any) -> None:
        append(journal, judgements)
        events.append("new judgement durable")

    monkeypatch.setattr(Journal, "append", appended)
    async with Engine(more) as engine:
        add = engine.relations.add

        def added(judgement: Judgement) -> None:
            if judgement.model == "synth":  # the earlier run's (this run adds "other")
                events.append("earlier judgement loaded")
            add(judgement)

        monkeypatch.setattr(engine.relations, "add", added)
        await engine.drain()
    assert events.index("new judgement durable") < events.index("earlier judgement loaded")
    assert events.count("earlier judgement loaded") == 80


async def test_a_locked_run_dir_is_refused(make_config: ConfigFactory) -> None:
    config = make_config(samples=3)
    async with Engine(config) as engine:
        with pytest.raises(RunLockedError, match="in use by another engine in this process"):
            async with Engine(config):
                pass
        await engine.drain()


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b'{"schema_version": 1, "run_na', "Invalid JSON"),
        (b'{"schema_version": 1}', "run_name: Field required"),
    ],
)
def test_a_damaged_manifest_is_one_message_saying_what_to_do(
    tmp_path: Path, content: bytes, detail: str
) -> None:
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(RunDirError) as raised:
        read_manifest(tmp_path)
    message = str(raised.value)
    assert f"it is damaged ({detail}" in message and "--new-run" in message
    assert "\n" not in message and "pydantic" not in message


@pytest.mark.parametrize("start", [b"", b'{\n  "schema_version": 1,\n  "run_name": "r"'])
async def test_a_manifest_larger_than_any_run_writes_is_not_read_whole(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, start: bytes
) -> None:
    # Another program's manifest.json of a gigabyte in the output folder was read whole
    # (and parsed) to tell whether a run wrote it.
    from trig_stream import manifest as manifest_module
    from trig_stream import resume_checks
    from trig_stream.manifest import MANIFEST_HEAD_BYTES, MAX_MANIFEST_BYTES

    config = make_config(samples=2)
    config.run_dir.mkdir(parents=True)
    (config.run_dir / MANIFEST).write_bytes(start)
    os.truncate(config.run_dir / MANIFEST, MAX_MANIFEST_BYTES + 4 * 2**20)  # sparse: no disk
    sizes = count_reads(monkeypatch, resume_checks, MANIFEST)
    sizes_read = count_reads(monkeypatch, manifest_module, MANIFEST)
    said = f"{config.run_dir / MANIFEST} is larger than 16 MiB, and a run's manifest is a few"
    # A viewer reads it to show it: refused, read up to the cap only.
    with pytest.raises(RunDirError, match=re.escape(said)):
        read_manifest(config.run_dir)
    assert sizes_read and sum(sizes_read) <= MAX_MANIFEST_BYTES + 1
    if start:  # one that starts as a run's, damaged: a run with no results writes over it
        check_resume(config.run_dir, Manifest(run_name=config.run.name, task="t2i"))
        assert sum(sizes) <= MANIFEST_HEAD_BYTES
        return
    with pytest.raises(RunDirError, match=re.escape(said)):
        check_resume(config.run_dir, Manifest(run_name=config.run.name, task="t2i"))
    with pytest.raises(RunDirError, match=re.escape(said)):
        await run_to_end(config)
    assert sizes and sum(sizes) <= 2 * (MANIFEST_HEAD_BYTES + MAX_MANIFEST_BYTES + 1)
    assert not (config.run_dir / JOURNAL).exists()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (MANIFEST, b'{"name": "My PWA", "icons": []}'),
        (MANIFEST, b"[1, 2]"),
        (MANIFEST, b"not json at all"),
        (QUARANTINE, b'{"name": "a log of mine"}\n'),
        (QUARANTINE, b"notes\n"),
    ],
)
async def test_a_file_of_another_programs_is_never_written_over(
    make_config: ConfigFactory, name: str, content: bytes
) -> None:
    # A folder without results was taken for a fresh run directory: a web app's
    # manifest.json there was replaced by the run's, rc 0.
    config = make_config(samples=2)
    config.run_dir.mkdir(parents=True)
    (config.run_dir / name).write_bytes(content)
    what = "manifest" if name == MANIFEST else "quarantine list"
    said = (
        f"{config.run_dir / name} is not a trig-stream run directory's {what} (another "
        "program's file?), and a run would write over it: move it away, or use --new-run"
    )
    with pytest.raises(RunDirError) as raised:
        await run_to_end(config)
    assert said in str(raised.value)
    assert (config.run_dir / name).read_bytes() == content
    assert not (config.run_dir / JOURNAL).exists() and not (config.run_dir / IMAGES).exists()
    # validate says the same, reading only.
    with pytest.raises(RunDirError) as raised:
        check_resume(config.run_dir, Manifest(run_name=config.run.name, task="t2i"))
    assert said in str(raised.value)
    if name == MANIFEST:  # and so do the viewers, which write over nothing
        with pytest.raises(RunDirError) as raised:
            read_manifest(config.run_dir)
        viewed = str(raised.value)
        assert viewed.startswith(
            f"{config.run_dir / name} is not a trig-stream manifest (another program's file?)"
        )
        assert "write over" not in viewed


@pytest.mark.parametrize("content", [b"", b"\n", b"  \r\n\t"])
async def test_an_empty_manifest_is_ours_damaged_not_another_programs(
    make_config: ConfigFactory, content: bytes
) -> None:
    # An empty manifest.json was called another program's file: a fresh folder holding one
    # was refused (exit 3), and a run directory whose manifest a crash left empty was told
    # (by run, status and report alike) that a run would write over another program's file.
    config = make_config(samples=2)
    config.run_dir.mkdir(parents=True)
    (config.run_dir / MANIFEST).write_bytes(content)
    await run_to_end(config)  # nothing to protect: the run starts over it
    assert read_manifest(config.run_dir).run_name == config.run.name
    (config.run_dir / MANIFEST).write_bytes(content)  # now beside results
    with pytest.raises(RunDirError) as raised:
        await run_to_end(config)
    messages = [str(raised.value)]
    with pytest.raises(RunDirError) as raised:  # status, report and watch read it so
        read_manifest(config.run_dir)
    messages.append(str(raised.value))
    for message in messages:
        assert f"cannot read {config.run_dir / MANIFEST}: it is damaged (" in message
        assert "another program" not in message and "restore the file" in message


@pytest.mark.parametrize("content", [b"{", b"not json at all", b"\x00\x00\x00"])
async def test_an_unparsable_manifest_beside_our_results_is_damaged(
    make_config: ConfigFactory, content: bytes
) -> None:
    # Beside our journal or images it is ours, damaged: it was called another program's.
    config = make_config(samples=2)
    await run_to_end(config)
    (config.run_dir / MANIFEST).write_bytes(content)
    said = f"cannot read {config.run_dir / MANIFEST}: it is damaged ("
    with pytest.raises(RunDirError, match="it is damaged") as raised:
        await run_to_end(config)
    assert said in str(raised.value)
    with pytest.raises(RunDirError) as raised:
        read_manifest(config.run_dir)
    assert said in str(raised.value)
    # The images alone (the journal's lines gone) still tell it.
    (config.run_dir / JOURNAL).write_bytes(b"")
    with pytest.raises(RunDirError) as raised:
        read_manifest(config.run_dir)
    assert said in str(raised.value)


async def test_a_damaged_manifest_of_a_run_without_results_is_replaced(
    make_config: ConfigFactory,
) -> None:
    # Ours, damaged (not another program's): a run that holds nothing starts afresh, as
    # before; and quarantine lists of ours, empty or cut short by a crash, are replaced.
    config = make_config(samples=2)
    config.run_dir.mkdir(parents=True)
    (config.run_dir / MANIFEST).write_bytes(b'{"schema_version": 1, "run_na')
    (config.run_dir / QUARANTINE).write_bytes(b'{"schema_ver')
    await run_to_end(config)
    assert read_manifest(config.run_dir).run_name == config.run.name
    assert (config.run_dir / QUARANTINE).read_bytes() == b""
    await run_to_end(config)  # its own files, resumed


async def test_a_manifest_saved_with_a_byte_order_mark_is_read_and_written_without(
    make_config: ConfigFactory,
) -> None:
    # A manifest saved by an editor that writes a UTF-8 byte order mark (Notepad), after a
    # hand edit the README allows, was called damaged ("Invalid JSON: expected value at
    # line 1 column 1") by validate, run and status.
    config = make_config(samples=2)
    await run_to_end(config)
    path = config.run_dir / MANIFEST
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_manifest(config.run_dir).run_name == config.run.name  # status, report, watch
    check_resume(config.run_dir, read_manifest(config.run_dir))  # validate
    await run_to_end(config)
    assert path.read_bytes().startswith(b"{")  # the run's rewrite leaves the mark out
    assert read_manifest(config.run_dir).run_name == config.run.name


def test_a_run_dir_of_a_later_format_is_refused_not_read_as_this_one(tmp_path: Path) -> None:
    manifest = Manifest(run_name="later", task="t2i", schema_version=MANIFEST_VERSION + 1)
    (tmp_path / MANIFEST).write_text(manifest.model_dump_json())
    with pytest.raises(RunDirError) as raised:
        read_manifest(tmp_path)
    assert f"written by a later trig-stream (record format {MANIFEST_VERSION + 1}" in str(
        raised.value
    )


async def test_a_manifest_written_now_is_named_a_later_one_by_a_reader_of_format_1(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest gained retry_errors and journal_lines, and its judges params.scoring_rules,
    # since format 1: a trig-stream that knew format 1 alone called it damaged, or a journal
    # copied in, or other settings, instead of a later trig-stream's.
    config = make_config(samples=2)
    await run_to_end(config)
    written = json.loads((config.run_dir / MANIFEST).read_text())
    assert written["schema_version"] > 1
    assert written["judges"]["trigscore"]["params"]["scoring_rules"] == SCORING_RULES
    monkeypatch.setattr(manifest_module, "MANIFEST_VERSION", 1)  # a reader of format 1
    with pytest.raises(RunDirError) as raised:
        read_manifest(config.run_dir)
    assert str(raised.value) == (
        f"{config.run_dir} was written by a later trig-stream (record format "
        f"{written['schema_version']}; this one knows formats up to 1): use that version, or "
        "start a fresh run with --new-run"
    )


async def test_a_manifest_of_format_1_resumes_and_is_written_again_in_this_format(
    make_config: ConfigFactory,
) -> None:
    config = make_config(samples=4)
    await run_to_end(config)
    path = config.run_dir / MANIFEST
    older = {**json.loads(path.read_text()), "schema_version": 1}
    path.write_text(json.dumps(older, indent=2))
    assert read_manifest(config.run_dir).schema_version == 1  # status, report, watch
    check_resume(config.run_dir, read_manifest(config.run_dir))  # validate
    journal_path = config.run_dir / JOURNAL
    journal_path.write_text("".join(journal_path.read_text().splitlines(keepends=True)[:-2]))
    assert len(await run_to_end(config)) == 2
    assert json.loads(path.read_text())["schema_version"] == MANIFEST_VERSION


def test_a_run_dir_locked_by_another_process_names_its_pid(tmp_path: Path) -> None:
    holder = (
        "import sys\n"
        "from trig_stream import store\n"
        "run = store.RunDir(__import__('pathlib').Path(sys.argv[1]))\n"
        "run._acquire_lock()\n"
        "run._write_pid()\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "locked\n"
        with pytest.raises(
            RunLockedError, match=rf"another trig-stream process \(pid {process.pid}\)"
        ):
            store.RunDir(tmp_path)._acquire_lock()
    finally:
        process.communicate("")


def test_a_run_lock_deleted_by_hand_does_not_let_a_second_run_in(tmp_path: Path) -> None:
    manifest = Manifest(run_name="locked", task="t2i")
    first, _ = store.RunDir.open(tmp_path, manifest)
    try:
        (tmp_path / LOCK).unlink()  # "stale", to the eye
        with pytest.raises(RunLockedError, match="its journal is locked"):
            store.RunDir.open(tmp_path, manifest)
    finally:
        first.close()
    second, _ = store.RunDir.open(tmp_path, manifest)  # once the first is gone, it may
    second.close()


def test_a_run_turned_away_by_the_journal_lock_leaves_no_pid_in_the_run_lock(
    tmp_path: Path,
) -> None:
    # It wrote its pid into the run.lock it made before the journal's lock turned it away:
    # the file then named a process that had exited, not the one running.
    manifest = Manifest(run_name="locked", task="t2i")
    first, _ = store.RunDir.open(tmp_path, manifest)
    try:
        (tmp_path / LOCK).unlink()
        with pytest.raises(RunLockedError, match="its journal is locked"):
            store.RunDir.open(tmp_path, manifest)
        assert (tmp_path / LOCK).read_bytes() == b""
        assert find_writer(tmp_path) == Writer(pid=None, run_lock_held=False)
        with pytest.raises(RunLockedError, match="its journal is locked"):
            check_resume(tmp_path, manifest)  # validate, as the run
    finally:
        first.close()
    assert find_writer(tmp_path) is None


def test_a_run_lock_just_taken_names_no_pid_of_the_run_before(tmp_path: Path) -> None:
    # Until the journal is locked too, the run writes no pid: the one of the run before
    # (gone) must not be shown as this run's meanwhile.
    (tmp_path / LOCK).write_text("4194303")
    run = store.RunDir(tmp_path)
    run._acquire_lock()
    try:
        assert find_writer(tmp_path) == Writer(pid=None, run_lock_held=True)
        manifest = Manifest(run_name="opening", task="t2i")
        with pytest.raises(RunLockedError, match="in use by another run;"):
            check_resume(tmp_path, manifest)
    finally:
        run.close()


def test_a_run_writes_its_pid_only_once_its_manifest_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pid came before the manifest: while a resume checked its settings, a viewer that
    # saw the pid took the run before's manifest (its --retry-errors) for this run's.
    before = Manifest(run_name="pid", task="t2i", retry_errors=True, journal_lines=3)
    (tmp_path / "manifest.json").write_text(before.model_dump_json())
    seen: list[bool | None] = []
    write_pid = store.RunDir._write_pid

    def look_then_write(run: store.RunDir) -> None:
        seen.append(read_manifest(tmp_path).retry_errors)
        write_pid(run)

    monkeypatch.setattr(store.RunDir, "_write_pid", look_then_write)
    run, _ = store.RunDir.open(tmp_path, Manifest(run_name="pid", task="t2i", retry_errors=False))
    try:
        assert seen == [False]
        assert find_writer(tmp_path) == Writer(pid=os.getpid(), run_lock_held=True)
    finally:
        run.close()


def test_a_run_turned_away_by_the_journal_lock_touches_nothing(tmp_path: Path) -> None:
    # It removed the running run's temporary images and cut its newest journal bytes (as a
    # crash's leftovers) before trying the lock: the first run then failed, or lost lines.
    manifest = Manifest(run_name="locked", task="t2i")
    first, _ = store.RunDir.open(tmp_path, manifest)
    try:
        (tmp_path / LOCK).unlink()
        partial = tmp_path / "images" / PARTIAL
        partial.mkdir(parents=True)
        (partial / "being-written.png").write_bytes(b"half an image")
        journal = tmp_path / JOURNAL
        with journal.open("ab") as handle:
            handle.write(b'{"schema_version":1,"model":"synth"')  # a line being written
        before = journal.read_bytes()
        with pytest.raises(RunLockedError, match="its journal is locked"):
            store.RunDir.open(tmp_path, manifest)
        assert journal.read_bytes() == before
        assert (partial / "being-written.png").exists()
    finally:
        first.close()


def test_a_lock_error_leaves_no_open_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    # The error's traceback (kept here) holds the frame, and so any handle left open in it.
    with pytest.raises(OSError, match="No locks available") as raised:
        store.RunDir(tmp_path)._acquire_lock()
    assert raised.traceback
    fds = Path("/proc/self/fd")
    assert not [fd for fd in fds.iterdir() if fd.resolve() == tmp_path / LOCK]


async def test_a_fresh_runs_judgements_are_analysed_by_the_time_results_gives_them(
    make_config: ConfigFactory,
) -> None:
    # With no earlier judgements to join first, nothing holds this run's back: a consumer
    # that looks up the analysis of the judgement it just received finds it there.
    config = make_config(samples=8)
    async with Engine(config) as engine:
        received = 0
        async for judgement in engine.results:
            received += 1
            assert engine.relations.added >= received
            engine.relations.analysis(judgement.model, judgement.metric)


async def test_live_analysis_includes_earlier_runs(make_config: ConfigFactory) -> None:
    config = make_config(samples=40)
    async with Engine(config) as engine:
        async for _ in engine.results:
            break
    async with Engine(config) as engine:
        await engine.drain()
        live = engine.relations.analysis("synth", "trigscore")
    from trig_stream.analysis import analyse_judgements
    from trig_stream.journal import latest_judgements

    batch = analyse_judgements(latest_judgements(config.run_dir / JOURNAL).values())
    assert live == batch[("synth", "trigscore")]
    assert sum(p.n for p in live.pairs) == 40


async def test_live_analysis_equals_the_batch_one_when_new_judgements_land_first(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Earlier runs' judgements load in the background while the run goes on. Here the
    # loading is held until this run's first judgements have landed: the analysis must
    # still take them in the journal's order, or its sums differ in the last bits.
    config = make_config(samples=40)
    async with Engine(config) as engine:
        async for _ in engine.results:
            break
    landed = threading.Event()
    count = PersistStage.count
    take = persisting._take

    def count_then_signal(self: PersistStage, batch: list[Judgement]) -> None:
        count(self, batch)
        landed.set()

    def take_after_landing(items: Iterator[Judgement], size: int) -> list[Judgement]:
        assert landed.wait(timeout=30)
        return take(items, size)

    monkeypatch.setattr(PersistStage, "count", count_then_signal)
    monkeypatch.setattr(persisting, "_take", take_after_landing)
    async with Engine(config) as engine:
        await engine.drain()
        live = engine.relations.analysis("synth", "trigscore")
    from trig_stream.analysis import analyse_judgements
    from trig_stream.journal import latest_judgements

    batch = analyse_judgements(latest_judgements(config.run_dir / JOURNAL).values())
    assert live == batch[("synth", "trigscore")]


async def test_live_analysis_after_retry_errors_equals_the_batch_one_of_the_journal(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # A --retry-errors run left every earlier ``error`` line out of the live analysis, those
    # it did not ask again too (here: the pairs its dataset no longer selects): their images
    # vanished from the excluded counts, and a pair of errors only from the analysis.
    failing = make_config(
        samples=24,
        judges=[{"name": "trigscore", "backend": "fake", "options": {"error_rate": 0.5}}],
    )
    await run_to_end(failing)
    one_pair = make_config(dataset={"path": str(tmp_path / "prompts.json"), "pairs": ["IQ-R_TA-C"]})
    judge = FakeJudge(options=FakeJudgeOptions())
    async with Engine(one_pair, judges=[judge], retry_errors=True) as engine:
        await engine.drain()
        live = engine.relations.snapshot()
    assert judge.requests > 0
    from trig_stream.analysis import analyse_judgements

    batch = analyse_judgements(read_journal(one_pair.run_dir / JOURNAL))
    assert live == batch
    analysis = batch[("synth", "trigscore")]
    kept_errors = [p for p in analysis.pairs if p.pair != "IQ-R_TA-C" and p.excluded > 0]
    assert kept_errors  # errors not asked again stay in the analysis, as excluded images
    retried = analysis.pair("IQ-R_TA-C")
    assert retried is not None and retried.excluded == 0


async def test_partial_image_files_left_by_a_crash_are_removed(make_config: ConfigFactory) -> None:
    config = make_config(samples=2)
    await run_to_end(config)
    partial = config.run_dir / "images" / ".partial"
    assert partial.is_dir() and not any(partial.iterdir())  # each write renamed its file
    leftover = partial / ".IQ-R_TA-C_1.png.123.456.tmp"
    leftover.write_bytes(b"half a png")
    await run_to_end(config)
    assert not leftover.exists()


async def test_a_partial_image_file_that_cannot_be_removed_is_named_and_the_run_goes_on(
    make_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One in a folder that cannot be written stopped even a finished run ("cannot open the
    # run directory .../.partial/.x.png.99999.1.tmp: Permission denied") while validate said
    # OK: it is only a leftover, and a new temporary image takes a name of its own.
    config = make_config(samples=2)
    first = await run_to_end(config)
    partial = config.run_dir / IMAGES / PARTIAL
    leftover = partial / ".IQ-R_TA-C_1.png.99999.1.tmp"
    leftover.write_bytes(b"half a png")
    removable = partial / ".IQ-R_TA-C_2.png.99999.1.tmp"
    removable.write_bytes(b"half a png")
    unlink = Path.unlink

    def refused(path: Path, missing_ok: bool = False) -> None:
        if path == leftover:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    with caplog.at_level("WARNING", logger="trig_stream.run_dir_access"):
        assert await run_to_end(config) == []  # nothing left to judge
    said = (
        f"{partial} holds 1 temporary image(s) left by a crash that cannot be removed (the "
        f"first: {leftover.name}: Permission denied): left in place"
    )
    assert said in caplog.text
    assert leftover.exists() and not removable.exists()
    assert len(journal(config)) == len(first)


async def test_what_is_no_temporary_image_in_partial_is_left_alone_and_named(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A folder in images/.partial stopped every resume ("cannot open the run directory:
    # Is a directory") while validate said OK.
    config = make_config(samples=2)
    await run_to_end(config)
    partial = config.run_dir / IMAGES / PARTIAL
    (partial / "sub").mkdir()
    (partial / "sub" / "f").write_text("mine")
    leftover = partial / ".IQ-R_TA-C_1.png.123.456.tmp"
    leftover.write_bytes(b"half a png")
    said = f"{partial} holds 1 entry(ies) a run never writes there (the first: sub, not a plain"
    with caplog.at_level("WARNING", logger="trig_stream.run_dir_access"):
        check_resume(config.run_dir, read_manifest(config.run_dir))
    assert said in caplog.text  # validate says what the run will
    caplog.clear()
    with caplog.at_level("WARNING", logger="trig_stream.run_dir_access"):
        await run_to_end(config)
    assert said in caplog.text
    assert not leftover.exists() and (partial / "sub" / "f").read_text() == "mine"


async def test_a_manifests_temporary_file_left_by_a_crash_is_removed(
    make_config: ConfigFactory,
) -> None:
    # Written beside the manifest, it stayed in the run directory for good; a file of the
    # user's that only looks alike stays.
    config = make_config(samples=2)
    await run_to_end(config)
    leftover = config.run_dir / ".manifest.json.123.456.tmp"
    leftover.write_bytes(b'{"schema_ver')
    kept = config.run_dir / "notes.tmp"
    kept.write_text("mine")
    hidden = config.run_dir / ".notes.2024.12.tmp"
    hidden.write_text("mine too")
    folder = config.run_dir / ".manifest.json.1.2.tmp"
    folder.mkdir()
    await run_to_end(config)
    assert not leftover.exists() and kept.read_text() == "mine"
    assert hidden.read_text() == "mine too" and folder.is_dir()


def test_files_written_together_are_complete_and_leave_no_temporary_files(
    tmp_path: Path,
) -> None:
    temp = tmp_path / "partial"
    temp.mkdir()
    files = [
        (tmp_path / "a" / "one.png", b"first"),
        (tmp_path / "a" / "two.png", b"second" * 1000),
        (tmp_path / "b" / "three.png", b""),
    ]
    write_atomic_many(files, temp_dir=temp)
    assert [path.read_bytes() for path, _ in files] == [data for _, data in files]
    assert not any(temp.iterdir())
    # A write that fails part way leaves the files before it whole and none half written.
    blocker = tmp_path / "c"
    blocker.write_bytes(b"a file where a folder should be")
    with pytest.raises(FileExistsError):
        write_atomic_many(
            [(tmp_path / "a" / "four.png", b"fourth"), (blocker / "five.png", b"x")],
            temp_dir=temp,
        )
    assert (tmp_path / "a" / "four.png").read_bytes() == b"fourth"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["four.png", "one.png", "two.png"]


def test_files_written_together_are_all_kept_as_they_were_when_one_fails(
    tmp_path: Path,
) -> None:
    # A report of many files on a disk that filled up part way: none of them may be new
    # beside old ones, and no temporary file may stay.
    files = [(tmp_path / "one.json", b"old one"), (tmp_path / "plots" / "two.png", b"old two")]
    write_atomic_together(files)
    blocker = tmp_path / "c"
    blocker.write_bytes(b"a file where a folder should be")
    with pytest.raises(FileExistsError):
        write_atomic_together(
            [(tmp_path / "one.json", b"new one"), (blocker / "three.png", b"x")],
        )
    assert [path.read_bytes() for path, _ in files] == [b"old one", b"old two"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "one.json", "plots"]
    write_atomic_together([(tmp_path / "one.json", b"new"), (files[1][0], b"new two")])
    assert [path.read_bytes() for path, _ in files] == [b"new", b"new two"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c", "one.json", "plots", "two.png"]


@pytest.mark.parametrize("together", [False, True], ids=["write_atomic", "together"])
def test_a_replaced_file_keeps_its_permissions(tmp_path: Path, together: bool) -> None:
    # The temporary renamed over it took the umask's permissions: a private 0640 comparison
    # or report file became 0644, readable by all.
    kept, new = tmp_path / "cmp.md", tmp_path / "new.md"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    if together:
        write_atomic_together([(kept, b"new"), (new, b"first")])
    else:
        write_atomic(kept, b"new")
        write_atomic(new, b"first")
    assert kept.read_bytes() == b"new"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask  # a new file: as before


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_files_written_together_refuse_what_stands_where_a_file_goes(
    tmp_path: Path, kind: str
) -> None:
    # A folder where the last file goes: the files before it were renamed into place, then
    # "Is a directory", new files beside old ones, naming the report's folder.
    files = [(tmp_path / "one.json", b"old one"), (tmp_path / "plots" / "two.png", b"old two")]
    write_atomic_together(files)
    in_the_way = files[1][0]
    in_the_way.unlink()
    if kind == "folder":
        in_the_way.mkdir()
    else:
        os.mkfifo(in_the_way)
    with pytest.raises(UnfitFileError) as raised:
        write_atomic_together([(files[0][0], b"new one"), (in_the_way, b"new two")])
    what = "folder" if kind == "folder" else "named pipe (FIFO)"
    assert raised.value.strerror == (
        f"{in_the_way} is a {what}, where a file of that name is to be written; move or remove it"
    )
    assert raised.value.filename == str(in_the_way)
    assert files[0][0].read_bytes() == b"old one"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["one.json", "plots", "two.png"]
    # A symbolic link there is replaced, not written through.
    in_the_way.rmdir() if kind == "folder" else in_the_way.unlink()
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"theirs")
    in_the_way.symlink_to(target)
    write_atomic_together([(files[0][0], b"new one"), (in_the_way, b"new two")])
    assert not in_the_way.is_symlink() and in_the_way.read_bytes() == b"new two"
    assert target.read_bytes() == b"theirs"


@pytest.mark.parametrize("name", ["c" * 245 + ".toml", "é" * 122 + ".toml"], ids=["ascii", "utf8"])
def test_a_file_whose_name_is_near_the_limit_is_written(tmp_path: Path, name: str) -> None:
    # The temporary name (".{name}.{pid}.{thread}.tmp") passed 255 bytes: "File name too long"
    # for a name the system takes.
    assert len(name.encode()) <= 255
    write_atomic(tmp_path / name, b"text")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == b"text"


def test_new_folders_and_the_journal_have_durable_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A synced file survives a crash only if its name does: its folder must be synced,
    # and a new folder's own name in the folder above it.
    synced: list[Path] = []
    monkeypatch.setattr(files_module, "sync_dir", synced.append)
    monkeypatch.setattr(journal_module, "sync_dir", synced.append)
    image = tmp_path / "images" / "t2i" / "flux" / "one.png"
    write_atomic_many([(image, b"png")], temp_dir=tmp_path)
    assert synced == [tmp_path, tmp_path / "images", tmp_path / "images" / "t2i", image.parent]
    synced.clear()
    write_atomic_many([(image.with_name("two.png"), b"png")], temp_dir=tmp_path)
    assert synced == [image.parent]  # the folders exist: only the new file's name to sync
    synced.clear()
    for _ in range(2):  # the second time it exists: nothing more to sync
        journal = Journal(tmp_path / JOURNAL)
        journal.open()
        journal.close()
    assert synced == [tmp_path]


def test_relative_names_are_of_files_inside_the_run_dir_only(tmp_path: Path) -> None:
    run = store.RunDir(tmp_path / "run")
    assert run.relative_name(tmp_path / "run" / "images" / "t2i" / "a.png") == "images/t2i/a.png"
    with pytest.raises(ValueError, match="is not in the subpath"):
        run.relative_name(tmp_path / "run-2" / "a.png")  # shares the name's start, not the folder


def test_journal_reads_each_samples_digest_whatever_the_field_order(tmp_path: Path) -> None:
    record = digest_record("ok", "IQ-R_IQ-O_1")
    line = record.model_dump_json().encode() + b"\n"
    reordered = json.dumps(json.loads(line), sort_keys=True).encode() + b"\n"
    older = record.model_copy(update={"sample_digest": None}).model_dump_json().encode() + b"\n"
    path = tmp_path / JOURNAL
    path.write_bytes(older + reordered)
    state = Journal(path).open()
    assert state.digests == {"IQ-R_IQ-O_1": "0123456789abcdef"}
    assert state.is_done(record.key, retry_errors=False)


def test_journal_state_keeps_the_latest_status_of_each_key() -> None:
    state = JournalState()
    first = ("synth", "IQ-R_TA-C_1", "IQ-R", "trigscore")
    other_metric = ("synth", "IQ-R_TA-C_1", "IQ-R", "toxicity")
    state.record(first, "error")
    state.record(other_metric, "ok")
    assert state.is_done(first, retry_errors=False)
    assert not state.is_done(first, retry_errors=True)  # a failure is asked again
    state.record(first, "ok")  # a later line wins
    assert state.status(first) == "ok" and state.is_done(first, retry_errors=True)
    assert state.status(("synth", "IQ-R_TA-C_1", "TA-C", "trigscore")) is None
    assert state.status(("other", "IQ-R_TA-C_1", "IQ-R", "trigscore")) is None
    assert len(state) == 2


def _ends_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised, run in a thread that must end within ``seconds``."""
    raised: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert raised, f"still waiting after {seconds} s"
    return raised[0]


@pytest.mark.parametrize("kind", ["pipe", "folder"])
def test_a_journal_that_is_no_regular_file_is_refused_without_waiting(
    tmp_path: Path, kind: str
) -> None:
    # Opening a pipe for reading waits for a writer: a run, status or report hung there,
    # deaf to Ctrl-C, holding the run lock.
    path = tmp_path / JOURNAL
    if kind == "pipe":
        os.mkfifo(path)
    else:
        path.mkdir()
    for call in (lambda: Journal(path).open(), lambda: list(read_journal(path))):
        error = _ends_within(10, call)
        assert isinstance(error, RunDirError) and "is not a regular file" in str(error)


def test_one_fsync_covers_a_batch_of_journal_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / JOURNAL
    journal = Journal(path)
    journal.open()
    synced: list[int] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            synced.append(path.read_bytes().count(b"\n"))  # the lines it made durable
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    try:
        journal.append([digest_record("ok", f"IQ-R_IQ-O_{i}") for i in range(1, 4)])
        journal.append([digest_record("ok", "IQ-R_IQ-O_4")])
    finally:
        journal.close()
    assert synced == [3, 4]


async def test_each_judgement_is_fsynced_before_results_delivers_it(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(samples=6)
    path = config.run_dir / JOURNAL
    durable: set[tuple[str, str]] = set()
    batches: list[int] = []
    fsync = os.fsync

    def recording_write_all(fd: int, data: bytes) -> None:
        write_all(fd, data)
        batches.append(data.count(b"\n"))

    def recording_fsync(fd: int) -> None:
        fsync(fd)
        if path.exists() and os.path.samestat(os.fstat(fd), os.stat(path)):
            batches.append(0)  # the batch written before it is durable
            durable.update((j.data_id, j.dimension) for j in read_journal(path))

    monkeypatch.setattr("trig_stream.journal.write_all", recording_write_all)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    async with Engine(config) as engine:
        async for judgement in engine.results:
            assert (judgement.data_id, judgement.dimension) in durable
    assert len(durable) == 12
    # Each batch written is fsynced once, before the next is written.
    assert batches[1::2] == [0] * (len(batches) // 2) and 0 not in batches[::2]
    assert sum(batches) == 12


def test_a_journal_deleted_during_the_run_stops_it(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL
    journal = Journal(path)
    journal.open()
    try:
        journal.append([digest_record("ok", "IQ-R_IQ-O_1")])
        path.unlink()
        with pytest.raises(RunDirError, match="was deleted while the run went on"):
            journal.append([digest_record("ok", "IQ-R_IQ-O_2")])
    finally:
        journal.close()


@pytest.mark.parametrize("then", ["moved", "replaced"])
def test_a_journal_whose_run_directory_moved_during_the_run_stops_it(
    tmp_path: Path, then: str
) -> None:
    # Its lines went on in the file at the new place, the images to a folder made again at
    # the old one: a run split in two, resumable from neither.
    run_dir = tmp_path / "big"
    run_dir.mkdir()
    journal = Journal(run_dir / JOURNAL)
    journal.open()
    try:
        journal.append([digest_record("ok", "IQ-R_IQ-O_1")])
        run_dir.rename(tmp_path / "big-moved")
        if then == "replaced":
            run_dir.mkdir()
            (run_dir / JOURNAL).write_bytes((tmp_path / "big-moved" / JOURNAL).read_bytes())
        said = "deleted" if then == "moved" else "replaced"  # nothing at its path, or another
        with pytest.raises(RunDirError, match=f"was moved or {said} while the run went on"):
            journal.append([digest_record("ok", "IQ-R_IQ-O_2")])
    finally:
        journal.close()
    assert len((tmp_path / "big-moved" / JOURNAL).read_bytes().splitlines()) == 1


class MovesTheRunDir(SyntheticGenerator):
    """A synthetic generator (same fingerprint) that renames the run directory ``run_dir``
    to ``moved_to`` during its second call."""

    def __init__(self, run_dir: Path, moved_to: Path) -> None:
        super().__init__("synth", SyntheticOptions(size=16))
        self.run_dir, self.moved_to = run_dir, moved_to

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Any]:
        if len(self.calls) == 1:
            self.run_dir.rename(self.moved_to)
        return super().generate(requests, worker=worker, cancel=cancel)


class MovesTheRunDirAroundTheQuarantine(MovesTheRunDir):
    """Renames the run directory during its second call, on one side of
    :meth:`~trig_stream.store.RunDir.finish_quarantine` (which the test wraps): after the
    list was put in place, or before, with the list held until the rename is done."""

    def __init__(self, run_dir: Path, moved_to: Path, *, hold_quarantine: bool) -> None:
        super().__init__(run_dir, moved_to)
        self.hold_quarantine = hold_quarantine
        self.moved = threading.Event()
        self.quarantine_done = threading.Event()
        """Set once finish_quarantine returned or raised."""

    def finish_quarantine(self, finish: Callable[[store.RunDir], None], run: store.RunDir) -> None:
        if self.hold_quarantine:
            assert self.moved.wait(timeout=60)  # a safety net: the generator moves it at once
        try:
            finish(run)
        finally:
            self.quarantine_done.set()

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Any]:
        if len(self.calls) == 1:
            # The sample buffer holds the whole dataset: the list is put in place (or held)
            # however long this call waits.
            if not self.hold_quarantine:
                assert self.quarantine_done.wait(timeout=60)  # a safety net
            self.run_dir.rename(self.moved_to)
            self.moved.set()
            if self.hold_quarantine:
                # The list's failure is the run's first error, not the next image write's.
                assert self.quarantine_done.wait(timeout=60)  # a safety net
        return SyntheticGenerator.generate(self, requests, worker=worker, cancel=cancel)


@pytest.mark.parametrize("moved", ["after the quarantine list", "before the quarantine list"])
async def test_a_run_directory_moved_during_the_run_stops_it_not_made_again(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moved: str
) -> None:
    # `mv runs/big runs/big-moved` mid-run: runs/big was made again for the next images,
    # the journal went on in runs/big-moved with image paths into runs/big, and the stop
    # message said to resume runs/big, which then had results but no manifest. Moved before
    # the dataset was read through, the quarantine list met it gone and the run stopped with
    # "cannot replace runs/big/quarantine.jsonl: No such file or directory".
    config = make_config(samples=6)
    assert config.engine.sample_buffer >= 6
    moved_to = tmp_path / "moved"
    generator = MovesTheRunDirAroundTheQuarantine(
        config.run_dir, moved_to, hold_quarantine=moved.startswith("before")
    )
    finish = store.RunDir.finish_quarantine
    monkeypatch.setattr(
        store.RunDir, "finish_quarantine", lambda run: generator.finish_quarantine(finish, run)
    )
    with pytest.raises(RunDirError, match="was moved or deleted while the run went on") as raised:
        await run_to_end(config, generators=[generator])
    assert generator.moved.is_set() and generator.quarantine_done.is_set()
    assert f"If it was moved, put it back at {config.run_dir}" in str(raised.value)
    assert not config.run_dir.exists()  # never made again
    assert (moved_to / MANIFEST).is_file()
    # Everything the run wrote is in the one place, each image its lines name included.
    for judgement in read_journal(moved_to / JOURNAL):
        assert judgement.image is not None and (moved_to / judgement.image).is_file()


def test_a_run_directory_moved_as_its_manifest_is_written_is_said_to_be_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Moved while its journal was read: the manifest's write made the run directory again
    # at its old path, holding only the manifest, and the run went on split in two.
    run_dir, moved_to = tmp_path / "big", tmp_path / "big-moved"

    def moved_meanwhile(path: Path, manifest: Manifest, journal: JournalState) -> Manifest:
        run_dir.rename(moved_to)
        return resumed_manifest(path, manifest, journal)

    monkeypatch.setattr(store, "resumed_manifest", moved_meanwhile)
    with pytest.raises(RunDirError, match="was moved or deleted while the run went on"):
        store.RunDir.open(run_dir, Manifest(run_name="big", task="t2i"))
    assert not run_dir.exists()


def test_a_run_directory_moved_as_a_quarantine_write_fails_is_said_to_be_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The write's own reason (a full disk, say) hid that the run directory was gone.
    run_dir, moved_to = tmp_path / "big", tmp_path / "big-moved"
    run, _ = store.RunDir.open(run_dir, Manifest(run_name="big", task="t2i"))

    def moved_and_full(fd: int, data: bytes) -> None:
        run_dir.rename(moved_to)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "write_all", moved_and_full)
    try:
        with pytest.raises(RunDirError, match="was moved or deleted while the run went on"):
            run.quarantine(QuarantinedRecord(index=0, data_id=None, reason="no prompt", record={}))
    finally:
        run.close()


class DeletesTheRunDir(MovesTheRunDir):
    """A synthetic generator that deletes the run directory during its second call: gone
    from its path at once (renamed to ``moved_to`` first), as the run sees ``rm -rf`` end,
    while an image write in flight may meet the half-deleted folder."""

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Any]:
        if len(self.calls) == 1:
            self.run_dir.rename(self.moved_to)
            shutil.rmtree(self.moved_to)
        return SyntheticGenerator.generate(self, requests, worker=worker, cancel=cancel)


async def test_a_run_directory_deleted_during_the_run_is_not_said_to_be_there_to_put_back(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # `rm -rf runs/mv` mid-run was told "was moved or replaced ... put it back at runs/mv":
    # nothing to put back.
    config = make_config(samples=6)
    generator = DeletesTheRunDir(config.run_dir, tmp_path / "deleting")
    with pytest.raises(RunDirError) as raised:
        await run_to_end(config, generators=[generator])
    said = str(raised.value)
    assert f"the run directory {config.run_dir} was moved or deleted while the run went on" in said
    assert "if it was deleted, the same command starts the run afresh" in said
    assert not config.run_dir.exists()


def test_a_damaged_journal_line_is_described_without_its_control_characters() -> None:
    # `status` and `watch` quote what is wrong with a line, its names included.
    line = json.loads(digest_record("ok", "IQ-R_IQ-O_1").model_dump_json())
    line["model"] = "\x1b]0;PWNED\x07"
    with pytest.raises(ValueError, match="not a safe file name") as raised:
        parse_journal_line((json.dumps(line) + "\n").encode())
    problem = line_problem(raised.value)
    assert "PWNED" in problem and "\x1b" not in problem and "\x07" not in problem


async def test_an_image_whose_pixels_do_not_decode_is_made_again(
    make_config: ConfigFactory,
) -> None:
    # Its chunks' CRCs are right, which is all Pillow's verify checks: it was reused as it
    # was, and its sample could never be judged until the file was deleted by hand.
    config = make_config(samples=3)
    first = await run_to_end(config)
    image = first[0].image
    assert image is not None
    path = config.run_dir / image
    with Image.open(path) as stored:
        label = stored.info[SAMPLE_KEY]
    broken = png_with_image_data(BROKEN_IMAGE_DATA["half the rows"])
    path.write_bytes(with_sample_digest(broken, label))
    (config.run_dir / JOURNAL).write_text("")
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    results = await run_to_end(config, generators=[generator])
    assert generator.calls == [1] and len(results) == len(first)
    with Image.open(path) as remade:
        remade.load()
        assert remade.size == (16, 16)


async def test_an_image_the_engine_wrote_whole_is_reused_without_inflating_it(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every reused image was inflated again (~15 ms for a 1 MB 1024x1024 one, against ~1 ms
    # for its CRCs): 26 CPU-minutes before a finished run of 100k such images resumed with a
    # judge added. The engine wrote it whole, by an atomic rename, and says so in a chunk.
    config = make_config(samples=3)
    first = await run_to_end(config)
    image = first[0].image
    assert image is not None
    with Image.open(config.run_dir / image) as stored:
        assert stored.info[PIXELS_KEY] == PIXELS_WHOLE
        label = stored.info[SAMPLE_KEY]
    inflated: list[bytes] = []

    def counted(data: bytes) -> str | None:
        inflated.append(data)
        return pixel_data_problem(data)

    monkeypatch.setattr(reuse, "pixel_data_problem", counted)
    (config.run_dir / JOURNAL).write_text("")
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    results = await run_to_end(config, generators=[generator])
    assert generator.calls == [] and len(results) == len(first)
    assert inflated == []
    # Without the engine's word (copied before pixels were checked, put there by hand, or
    # another tool's file) it is inflated, and made again when broken.
    whole = encode_png(Image.new("RGB", (16, 16), (9, 8, 7)))
    broken = png_with_image_data(BROKEN_IMAGE_DATA["half the rows"])
    path = config.run_dir / image
    # (Asked without a label: with one, a file that records none is made again uninflated.)
    for data, asked_for, reused in [
        (with_sample_digest(whole, label), label, True),
        (whole, None, True),
        (with_sample_digest(broken, label), label, False),
        (broken, None, False),
    ]:
        path.write_bytes(data)
        assert (reuse.reusable_image(path, asked_for) is not None) is reused
        assert inflated[-1] == data


class HandsOverBytes(SyntheticGenerator):
    """A synthetic generator (same fingerprint) whose every picture is the PNG bytes ``png``,
    its pixels unchecked (``EncodedPicture``'s default)."""

    def __init__(self, png: bytes) -> None:
        super().__init__("synth", SyntheticOptions(size=16))
        self.png = png

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Any]:
        self.calls.append(len(requests))
        return [EncodedPicture(png=self.png) for _ in requests]


async def test_a_pixel_data_chunk_in_a_generators_bytes_does_not_spare_the_check(
    make_config: ConfigFactory,
) -> None:
    # A generator's PNG (say, one another trig-stream run wrote) carried a `trig-stream pixel
    # data: whole` chunk of its own, kept beside the engine's words: its pixels unchecked, a
    # resumed run reused the truncated image without inflating it and judged it again.
    broken = png_with_image_data(BROKEN_IMAGE_DATA["half the rows"])
    head = len(SIGNATURE) + 25  # after IHDR
    forged = broken[:head] + text_chunk(b"tEXt", PIXELS_KEY, PIXELS_WHOLE) + broken[head:]
    config = make_config(samples=1)
    first = await run_to_end(config, generators=[HandsOverBytes(forged)])
    image = first[0].image
    assert image is not None
    path = config.run_dir / image
    label = f"{first[0].sample_digest} synth {first[0].data_id} {first[0].seed}"
    assert reuse.reusable_image(path, label) is None
    (config.run_dir / JOURNAL).write_text("")
    generator = SyntheticGenerator("synth", SyntheticOptions(size=16))
    await run_to_end(config, generators=[generator])
    assert generator.calls == [1]  # made again: its pixels do not decode
    with Image.open(path) as remade:
        remade.load()
        assert remade.size == (16, 16)
