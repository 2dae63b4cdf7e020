"""Resuming across a change of scoring rules: refused, and a run directory older than the rules
in the fingerprint checked once by re-scoring its judgements."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ConfigFactory
from tests.test_engine import run_to_end
from trig_stream import FingerprintMismatch, journal
from trig_stream.config import RunConfig
from trig_stream.journal import JOURNAL
from trig_stream.manifest import MANIFEST, Manifest, read_manifest
from trig_stream.resume_checks import check_resume, resumed_manifest
from trig_stream.scoring import SCORING_RULES, SCORING_RULES_CHANGES

pytestmark = pytest.mark.anyio

Edit = Callable[[dict[str, Any]], None]


def _without_rules(fingerprint: dict[str, Any]) -> None:
    fingerprint["params"].pop("scoring_rules")


async def run_before_scoring_rules(
    make_config: ConfigFactory, edit: Edit | None = None, params: dict[str, Any] | None = None
) -> tuple[RunConfig, Manifest, dict[Path, bytes]]:
    """A finished run whose manifest and journal lines are as a trig-stream older than the
    scoring rules in the fingerprint wrote them (``params`` added to its judge's), the first
    ``ok`` line edited by ``edit``; the config's manifest, as validate builds it; and the run
    directory's files."""
    config = make_config(samples=3)
    await run_to_end(config)
    run_dir = config.run_dir
    configured = read_manifest(run_dir)
    data = json.loads((run_dir / MANIFEST).read_text())
    for fingerprint in data["judges"].values():
        _without_rules(fingerprint)
        fingerprint["params"].update(params or {})
    (run_dir / MANIFEST).write_text(json.dumps(data))
    lines = []
    edited = edit is None
    for raw in (run_dir / JOURNAL).read_text().splitlines():
        line = json.loads(raw)
        _without_rules(line["judge"])
        line["judge"]["params"].update(params or {})
        if not edited and line["status"] == "ok":
            assert edit is not None
            edit(line)
            edited = True
        lines.append(json.dumps(line) + "\n")
    (run_dir / JOURNAL).write_text("".join(lines))
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    return config, configured, files


async def test_a_run_dir_older_than_the_rules_whose_scores_agree_resumes_and_records_them(
    make_config: ConfigFactory,
) -> None:
    config, configured, _ = await run_before_scoring_rules(make_config)
    check_resume(config.run_dir, configured)  # validate says what run does
    assert await run_to_end(config) == []
    judges = read_manifest(config.run_dir).judges
    assert judges["trigscore"]["params"]["scoring_rules"] == SCORING_RULES
    # Its older lines, without the field, are the manifest's own on the next resume.
    check_resume(config.run_dir, configured)
    assert await run_to_end(config) == []


def _probability_zero_scored(line: dict[str, Any]) -> None:
    # What an earlier trig-stream made of a lone ' good' at -9999.0 (a probability of 0).
    line.update(score=0.75, top_logprobs=[[" good", -9999.0]])


def _underflow_scored(line: dict[str, Any]) -> None:
    # What an earlier trig-stream made of a lone ' good' whose probability underflows to 0.0.
    line.update(score=0.75, top_logprobs=[[" good", -1000.0], ["The", -0.01]])


def _positive_scored(line: dict[str, Any]) -> None:
    # What a trig-stream before 2eff5c6 made of a logprob above 0 (a probability above 1).
    line.update(score=0.9, top_logprobs=[[" good", 0.5], [" bad", -2.0]])


def _word_starting_like_a_rating_scored(line: dict[str, Any]) -> None:
    # What an earlier trig-stream's robust scorer made of "Extremely", read as excellent.
    line.update(score=0.832, top_logprobs=[["Extremely", -0.2], ["bad", -1.8], ["terrible", -3.0]])


@pytest.mark.parametrize(
    ("edit", "params"),
    [
        (_probability_zero_scored, {}),
        (_underflow_scored, {}),
        (_positive_scored, {}),
        (_word_starting_like_a_rating_scored, {}),
    ],
    ids=["probability-zero", "underflow", "positive", "word-starting-like-a-rating"],
)
async def test_a_run_dir_older_than_the_rules_with_a_score_changed_since_is_refused(
    make_config: ConfigFactory, edit: Edit, params: dict[str, Any]
) -> None:
    config, configured, files = await run_before_scoring_rules(make_config, edit, params)
    first = json.loads((config.run_dir / JOURNAL).read_text().splitlines()[0])
    said = (
        f"{config.run_dir} was judged by an earlier trig-stream, under scoring rules changed "
        "since: 1 judgement(s) of judge(s) 'trigscore' score otherwise now (the first: model "
        f"'synth', data_id {first['data_id']!r}, dimension {first['dimension']})"
    )
    with pytest.raises(FingerprintMismatch) as validated:
        check_resume(config.run_dir, configured)
    assert said in str(validated.value)
    assert "Use --new-run to judge afresh in a fresh run directory beside it" in str(
        validated.value
    )
    with pytest.raises(FingerprintMismatch) as ran:
        await run_to_end(config, retry_errors=True)
    assert str(ran.value) == str(validated.value)
    after = {p: p.read_bytes() for p in config.run_dir.rglob("*") if p.is_file()}
    after.pop(config.run_dir / "run.lock", None)
    assert after == files


def _near_certain(line: dict[str, Any]) -> None:
    # A server answering ' good' at 0.0 and every other token at -9999.0, a probability of
    # 0: the journal drops those, and today's trig-stream writes the same line.
    line.update(score=0.75, top_logprobs=[[" good", 0.0]])


def _unscorable_without_entries(line: dict[str, Any]) -> None:
    # Every top token at probability 0: nothing left to store, unscorable then as now.
    line.update(
        status="unscorable",
        score=None,
        top_logprobs=[],
        error="rating words only at probability 0 (' good': -9999.0), which count for nothing",
    )


@pytest.mark.parametrize("edit", [_near_certain, _unscorable_without_entries])
async def test_an_older_run_dir_whose_short_lists_score_as_stored_resumes(
    make_config: ConfigFactory, edit: Edit
) -> None:
    # A list shorter than the top_logprobs asked for is what a server's answer with the
    # other tokens at probability 0 stores: it was refused as a sampled token's score.
    asked = {"top_logprobs": 20}
    config, configured, _ = await run_before_scoring_rules(make_config, edit, asked)
    # As validate and a run build it for a judge asking for 20 top logprobs.
    judges = {
        name: {**entry, "params": {**entry["params"], **asked}}
        for name, entry in configured.judges.items()
    }
    configured = configured.model_copy(update={"judges": judges})
    state = check_resume(config.run_dir, configured)
    resumed = resumed_manifest(config.run_dir, configured, state)
    assert resumed.judges["trigscore"]["params"]["scoring_rules"] == SCORING_RULES


async def test_the_check_of_an_older_run_dir_reads_its_journal_once(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second full read of the journal doubled a resume's start on a long journal.
    config, configured, _ = await run_before_scoring_rules(make_config, _probability_zero_scored)
    reads: list[Path] = []
    real_open = journal.open_journal

    def counted(path: Path) -> Any:
        reads.append(path)
        return real_open(path)

    monkeypatch.setattr(journal, "open_journal", counted)
    with pytest.raises(FingerprintMismatch, match="1 judgement"):
        check_resume(config.run_dir, configured)
    assert reads == [config.run_dir / JOURNAL]


async def test_a_run_dir_of_other_scoring_rules_is_refused_naming_them(
    make_config: ConfigFactory,
) -> None:
    config = make_config(samples=2)
    await run_to_end(config)
    configured = read_manifest(config.run_dir)
    data = json.loads((config.run_dir / MANIFEST).read_text())
    data["judges"]["trigscore"]["params"]["scoring_rules"] = SCORING_RULES - 1
    (config.run_dir / MANIFEST).write_text(json.dumps(data))
    journal = config.run_dir / JOURNAL
    earlier = f'"scoring_rules":{SCORING_RULES - 1},'
    journal.write_text(journal.read_text().replace(f'"scoring_rules":{SCORING_RULES},', earlier))
    for check in (lambda: check_resume(config.run_dir, configured), None):
        with pytest.raises(FingerprintMismatch) as raised:
            if check is not None:
                check()
            else:
                await run_to_end(config)
        assert (
            f"judge 'trigscore': judged under trig-stream's earlier scoring rules "
            f"({SCORING_RULES - 1}), and this one scores by rules {SCORING_RULES}"
        ) in str(raised.value)
        assert f"rules {SCORING_RULES}: {SCORING_RULES_CHANGES[SCORING_RULES]}" in str(raised.value)
        assert "Use --new-run" in str(raised.value)


def _judged_under_rules(config: RunConfig, rules: int) -> None:
    """The finished run in ``config.run_dir`` as a trig-stream of scoring rules ``rules``
    wrote it: its manifest's judge entries and its journal lines."""
    data = json.loads((config.run_dir / MANIFEST).read_text())
    for fingerprint in data["judges"].values():
        fingerprint["params"]["scoring_rules"] = rules
    (config.run_dir / MANIFEST).write_text(json.dumps(data))
    journal = config.run_dir / JOURNAL
    earlier = f'"scoring_rules":{rules},'
    journal.write_text(journal.read_text().replace(f'"scoring_rules":{SCORING_RULES},', earlier))


async def test_a_run_dir_scored_by_trig_under_rules_1_resumes(make_config: ConfigFactory) -> None:
    # Rules 2 changed the robust scorer alone, yet a run whose judge scores by trig, its
    # numbers the same under both, was refused as judged under other rules.
    judges = [{"name": "trigscore", "backend": "fake", "scorer": "trig"}]
    config = make_config(samples=2, judges=judges)
    await run_to_end(config)
    configured = read_manifest(config.run_dir)
    _judged_under_rules(config, 1)
    check_resume(config.run_dir, configured)
    await run_to_end(config)
    # Its manifest now holds this trig-stream's rules, its journal lines the earlier ones.
    assert read_manifest(config.run_dir).judges["trigscore"]["params"]["scoring_rules"] == 2
    check_resume(config.run_dir, configured)
    await run_to_end(config)


@pytest.mark.parametrize("value", [None, "x", {"v": 1}, 1.5], ids=["null", "text", "dict", "float"])
async def test_a_run_dir_of_scoring_rules_that_are_no_number_is_refused_naming_the_field(
    make_config: ConfigFactory, value: Any
) -> None:
    # An edited manifest, or a third-party judge's own value there, was compared with the
    # config's rules as a number: a TypeError traceback from validate and run.
    config = make_config(samples=2)
    await run_to_end(config)
    configured = read_manifest(config.run_dir)
    data = json.loads((config.run_dir / MANIFEST).read_text())
    data["judges"]["trigscore"]["params"]["scoring_rules"] = value
    (config.run_dir / MANIFEST).write_text(json.dumps(data))
    journal = config.run_dir / JOURNAL
    written = f'"scoring_rules":{json.dumps(value, separators=(",", ":"))},'
    journal.write_text(journal.read_text().replace(f'"scoring_rules":{SCORING_RULES},', written))
    said = (
        f"judge 'trigscore': params.scoring_rules {json.dumps(value)} in the run dir, "
        f"{SCORING_RULES} in the config"
    )
    with pytest.raises(FingerprintMismatch) as validated:
        check_resume(config.run_dir, configured)
    assert said in str(validated.value)
    with pytest.raises(FingerprintMismatch) as ran:
        await run_to_end(config)
    assert said in str(ran.value)


_METRIC = {"backend": "metric", "model": "nsfw", "params": {"metric": "nsfw"}}


@pytest.mark.parametrize("stored_is_metric", [False, True], ids=["to-metric", "from-metric"])
def test_a_judge_of_another_backend_under_the_name_is_not_said_to_score_by_other_rules(
    stored_is_metric: bool,
) -> None:
    # A judge replaced by one of another backend (fake -> metric) was said to have judged
    # "under trig-stream's later scoring rules (1), and this one scores by rules not set".
    fake = {"backend": "fake", "model": "fake", "params": {"scoring_rules": SCORING_RULES}}
    stored, configured = (_METRIC, fake) if stored_is_metric else (fake, _METRIC)
    manifest = Manifest(run_name="r", task="t2i", judges={"trigscore": stored})
    found = manifest.differences(
        Manifest(run_name="r", task="t2i", judges={"trigscore": configured})
    )
    rules = ("not set", str(SCORING_RULES)) if stored_is_metric else (str(SCORING_RULES), "not set")
    assert (
        f"judge 'trigscore': params.scoring_rules {rules[0]} in the run dir, {rules[1]} in the "
        "config"
    ) in found
    assert not any("scores by rules" in line for line in found)


async def test_judges_of_two_backends_swapping_names_are_refused_naming_each_difference(
    make_config: ConfigFactory,
) -> None:
    # A resume wrote the config's scoring rules into a stored entry without them, a metric
    # judge's too: its difference went unsaid while the other judge's was said; and the texts
    # a metric judge leaves empty were shown as "".
    config = make_config(samples=2)
    await run_to_end(config)
    run_dir = config.run_dir
    vlm = {
        "backend": "openai",
        "model": "qwen",
        "template_version": "trig-1",
        "scorer": "robust",
        "confidence": False,
        "params": {"scoring_rules": SCORING_RULES},
    }
    metric = {**_METRIC, "template_version": "", "scorer": "", "confidence": False}
    data = json.loads((run_dir / MANIFEST).read_text())
    data["judges"] = {"trigscore": vlm, "nsfw": metric}
    (run_dir / MANIFEST).write_text(json.dumps(data))
    lines = [json.loads(line) for line in (run_dir / JOURNAL).read_text().splitlines()]
    judged = [
        {**line, "metric": name, "judge": judge}
        for line in lines
        for name, judge in data["judges"].items()
    ]
    (run_dir / JOURNAL).write_text("".join(json.dumps(line) + "\n" for line in judged))
    swapped = Manifest(
        run_name=config.run.name, task="t2i", judges={"trigscore": metric, "nsfw": vlm}
    )
    with pytest.raises(FingerprintMismatch) as raised:
        check_resume(run_dir, swapped)
    found = str(raised.value)
    for key, value in (
        ("params.scoring_rules", str(SCORING_RULES)),
        ("scorer", '"robust"'),
        ("template_version", '"trig-1"'),
    ):
        assert f"judge 'trigscore': {key} {value} in the run dir, not set in the config" in found
        assert f"judge 'nsfw': {key} not set in the run dir, {value} in the config" in found
    assert '""' not in found


@pytest.mark.parametrize(
    ("scorer", "stored_rules", "refused"),
    [("trig", 1, False), ("robust", 1, True), ("trig", SCORING_RULES + 1, True)],
    ids=["trig", "robust", "unknown-rules"],
)
def test_only_rules_that_leave_the_judges_scorer_alone_resume(
    scorer: str, stored_rules: int, refused: bool
) -> None:
    def manifest(rules: int) -> Manifest:
        params = {"scoring_rules": rules}
        judge = {"backend": "fake", "model": "fake", "scorer": scorer, "params": params}
        return Manifest(run_name="r", task="t2i", judges={"trigscore": judge})

    found = manifest(stored_rules).differences(manifest(SCORING_RULES))
    assert bool(found) is refused
    assert all("scoring rules" in line for line in found)
