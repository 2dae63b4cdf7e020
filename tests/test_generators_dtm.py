"""DTM prompt rewriting: relation sources, one instruction per relation, fallback on failure."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from tests.conftest import ConfigFactory, unblocked_after
from trig_stream import Engine
from trig_stream.backends.base import (
    GenerationRequest,
    Generator,
    hears_of_whole_input,
    tell_all_requested,
)
from trig_stream.backends.generators import rewrite_answers
from trig_stream.backends.generators.dtm_relations import (
    RelationTable,
    instruction,
    user_message,
)
from trig_stream.backends.generators.dtm_rewrite import DTMRewriteGenerator, DTMRewriteOptions
from trig_stream.backends.generators.image_folder import ImageFolderGenerator, ImageFolderOptions
from trig_stream.backends.generators.rewrite_answers import rewritten_prompt
from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP
from trig_stream.backends.registry import build_generator
from trig_stream.dimensions import Dimension
from trig_stream.errors import ConfigError, FatalBackendError, ItemError, NotAsked
from trig_stream.records import Sample
from trig_stream.testing.generation_api_server import Fault, GenerationAPIServer, default_rewrite
from trig_stream.testing.synthetic import draw

KEY = "rewrite-secret-key"
KEY_ENV = "TRIG_TEST_REWRITE_KEY"

# The opening word of each relation's guidance.
HEADINGS = {0: "Synergy", 3: "Bottleneck", 2: "Dominance", -2: "Dominance", 1: "Trade-off"}


def test_each_relation_has_its_own_instruction() -> None:
    texts = {code: instruction("IQ-R", "TA-C", code) for code in (-2, -1, 0, 1, 2, 3)}
    assert len(set(texts.values())) == 6
    for code, heading in HEADINGS.items():
        assert texts[code].startswith(heading)
    assert texts[-1].startswith("No clear relation")


def test_dominance_names_the_winner_and_strengthens_the_other() -> None:
    plus = instruction("IQ-R", "TA-C", 2)
    minus = instruction("IQ-R", "TA-C", -2)
    assert "favours IQ-R (Realism) at the expense of TA-C (Content alignment)" in plus
    assert "make the requirements of TA-C (Content alignment) explicit" in plus
    assert "favours TA-C (Content alignment) at the expense of IQ-R (Realism)" in minus
    assert "make the requirements of IQ-R (Realism) explicit" in minus


def test_relation_table_reads_both_orders() -> None:
    table = RelationTable.from_mapping({"IQ-R_TA-C": 2, "TA-S_IQ-A": 3, "D-K_R-T": -2})
    assert table.code("IQ-R", "TA-C") == 2
    assert table.code("TA-C", "IQ-R") == -2
    assert table.code("IQ-A", "TA-S") == 3
    assert table.code("R-T", "D-K") == 2
    assert table.code("IQ-O", "IQ-A") == -1
    assert table.as_dict() == {"D-K_R-T": -2, "IQ-A_TA-S": 3, "IQ-R_TA-C": 2}
    with pytest.raises(ValueError, match="relation code 5"):
        RelationTable.from_mapping({"IQ-R_TA-C": 5})
    with pytest.raises(ValueError, match="dimension"):
        RelationTable.from_mapping({"IQ-R_XX": 0})


@pytest.mark.parametrize(
    ("relations", "message"),
    [
        (
            {"IQ-R_TA-C": 2, "TA-C_IQ-R": 2},
            "relations 'IQ-R_TA-C' = 2 and 'TA-C_IQ-R' = 2 set one pair twice, with different "
            "relations (TA-C_IQ-R = 2 is IQ-R_TA-C = -2); keep one of the two keys",
        ),
        (
            {"IQ-R_TA-C": 0, "TA-C_IQ-R": 3},
            "relations 'IQ-R_TA-C' = 0 and 'TA-C_IQ-R' = 3 set one pair twice",
        ),
    ],
    ids=["dominance-both-ways", "synergy-and-bottleneck"],
)
def test_a_pair_named_in_both_orders_with_different_relations_is_refused(
    relations: dict[str, int], message: str
) -> None:
    # The last key won, silently: {"IQ-R_TA-C": -2}, {"IQ-R_TA-C": 3}.
    with pytest.raises(ValueError, match=re.escape(message)):
        RelationTable.from_mapping(relations)
    with pytest.raises(ValidationError, match=re.escape(message)):
        DTMRewriteOptions.model_validate(
            {"inner": {"backend": "synthetic"}, "model": "m", "relations": relations}
        )
    # The same relation written both ways is one relation.
    same = RelationTable.from_mapping({"IQ-R_TA-C": 2, "TA-C_IQ-R": -2, "IQ-A_TA-S": 3})
    assert same.as_dict() == {"IQ-R_TA-C": 2, "IQ-A_TA-S": 3}
    with pytest.raises(ValueError, match="relation code 7 is not one of"):
        RelationTable.from_mapping({"IQ-R_TA-C": 2, "TA-C_IQ-R": 7})


def write_report(path: Path) -> Path:
    """A relationship_codes.csv in the upstream layout for three dimensions."""
    path.write_text(
        ",IQ-R,TA-C,TA-S\n"
        "IQ-R,0.712,-2,NULL\n"
        "TA-C,[0.700-0.650],0.655,1\n"
        "TA-S,NULL,[0.610-0.580],0.590\n"
    )
    return path


def test_relation_table_from_report(tmp_path: Path) -> None:
    table = RelationTable.from_report(write_report(tmp_path / "relationship_codes.csv"))
    assert table.code("IQ-R", "TA-C") == -2  # row IQ-R, column TA-C: the column wins
    assert table.code("TA-C", "IQ-R") == 2
    assert table.code("TA-S", "TA-C") == 1
    assert table.code("IQ-R", "TA-S") == -1
    assert len(table) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("dim,IQ-R\nIQ-R,0.5\n")
    with pytest.raises(ValueError, match="header"):
        RelationTable.from_report(bad)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(",IQ-R,TA-C\nIQ-R,,-2 é\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: byte \d+ is not UTF-8 text"):
        RelationTable.from_report(latin)
    with pytest.raises(OSError, match=r"missing\.csv: cannot read it .*relationship_codes\.csv"):
        RelationTable.from_report(tmp_path / "missing.csv")
    # A code is an integer: 1.9 was read as 1, inf ended the run with a traceback; one out
    # of range was refused without naming the report.
    for cell in ("1.9", "-0.5", "inf", "1e400", "nan", "-3", "5"):
        odd = tmp_path / "odd.csv"
        odd.write_text(f",IQ-R,TA-C\nIQ-R,,{cell}\n")
        expected = rf"odd\.csv: cell IQ-R_TA-C is '{cell}', no relation code \(an integer from"
        with pytest.raises(ValueError, match=expected):
            RelationTable.from_report(odd)
    for text, problem in [
        (",IQ-R,TA-C\n", "a header and no row of relation codes"),
        (",IQ-R,IQ-R\nIQ-R,,1\n", "names a dimension twice"),
        # The last of two rows won; codes below the diagonal gave an empty table (every
        # pair "No clear relation").
        (",IQ-R,TA-C\nIQ-R,,1\nIQ-R,,-2\n", r"odd\.csv: lists row IQ-R twice; keep one row"),
        (",IQ-R,TA-C\nIQ-R,,\nTA-C,2,\n", r"odd\.csv: holds relation codes only below the diag"),
    ]:
        odd.write_text(text)
        with pytest.raises(ValueError, match=problem):
            RelationTable.from_report(odd)
    excel = tmp_path / "excel.csv"  # saved with a byte order mark
    excel.write_bytes(b"\xef\xbb\xbf,IQ-R,TA-C\nIQ-R,,-2\n")
    assert RelationTable.from_report(excel).code("IQ-R", "TA-C") == -2
    # A byte that is no UTF-8 is counted from the file's start: it was 3 too low, the mark's.
    excel.write_bytes(b"\xef\xbb\xbf,IQ-R,TA-C\nIQ-R,,-2 \xe9\n")
    with pytest.raises(ValueError, match=r"excel\.csv: byte 23 is not UTF-8 text"):
        RelationTable.from_report(excel)


def test_a_report_that_is_a_pipe_is_refused_not_waited_on(tmp_path: Path) -> None:
    # Reading a named pipe waited for a writer: validate and run hung.
    fifo = tmp_path / "relationship_codes.csv"
    os.mkfifo(fifo)
    expected = (
        f"report {fifo}: cannot read it (it is a named pipe (FIFO), not a file); it should be "
        "an earlier run's relationship_codes.csv"
    )
    with unblocked_after(fifo, 10) as fired, pytest.raises(OSError, match=re.escape(expected)):
        RelationTable.from_report(fifo)
    assert not fired


def test_a_report_that_is_a_device_or_too_large_is_refused_without_reading_it(
    tmp_path: Path,
) -> None:
    # /dev/zero was read until memory ran out (a MemoryError traceback); /dev/null stands
    # for the devices here, a sparse file for one too large to be a report.
    with pytest.raises(OSError, match=r"cannot read it \(it is a character device, not a file\)"):
        RelationTable.from_report(Path(os.devnull))
    large = tmp_path / "large.csv"
    with large.open("wb") as file:
        file.truncate(16 * 2**20 + 1)  # past the limit of a settings file
    with pytest.raises(OSError, match=r"large\.csv: cannot read it \(it is larger than 16 MiB\)"):
        RelationTable.from_report(large)


def test_a_report_field_past_the_csv_limit_is_refused_in_one_line(tmp_path: Path) -> None:
    # The csv module refuses a field over 131,072 characters: its error was a traceback.
    path = tmp_path / "relationship_codes.csv"
    path.write_text(",IQ-R,TA-C\nIQ-R,," + "1" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"relationship_codes\.csv: cannot read it as CSV \(field"):
        RelationTable.from_report(path)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[GenerationAPIServer]:
    monkeypatch.setenv(KEY_ENV, KEY)
    with GenerationAPIServer(api_key=KEY) as running:
        yield running


class RecordingGenerator(Generator):
    """An inner generator that records the prompts it is given."""

    def __init__(self) -> None:
        self.name = "inner"
        self.prompts: list[str] = []
        self.loaded = self.closed = self.stopped_loading = self.stopped_waiting = False

    def fingerprint(self) -> dict[str, Any]:
        return {"backend": "recording"}

    def load(self) -> None:
        self.loaded = True

    def stop_loading(self) -> None:
        self.stopped_loading = True

    def stop_waiting(self) -> None:
        self.stopped_waiting = True

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Any]:
        self.prompts.extend(r.sample.prompt for r in requests)
        return [draw(r.seed, 8) for r in requests]

    def close(self) -> None:
        self.closed = True


def rewriter(server: GenerationAPIServer, **options: Any) -> DTMRewriteGenerator:
    validated = DTMRewriteOptions.model_validate(
        {
            "inner": {"backend": "synthetic"},
            "model": "rewriter-llm",
            "base_url": server.base_url,
            "api_key_env": KEY_ENV,
            "relations": {
                "IQ-R_TA-C": 0,
                "IQ-A_TA-S": 3,
                "IQ-O_TA-R": 1,
                "D-K_IQ-R": 2,
                "R-T_IQ-A": 2,
            },
            **options,
        }
    )
    generator = DTMRewriteGenerator("m", validated, RecordingGenerator(), sleep=lambda s, c: False)
    generator.load()
    return generator


def synthetic_rewriter(server: GenerationAPIServer, inner: dict[str, Any]) -> dict[str, Any]:
    """A ``[[generators]]`` entry: ``dtm_rewrite`` around ``inner``, rewriting with the
    loopback LLM ``server`` for the IQ-R_TA-C pair (a synergy)."""
    return {
        "name": "synth_dtm",
        "backend": "dtm_rewrite",
        "options": {
            "inner": inner,
            "model": "rewriter-llm",
            "base_url": server.base_url,
            "api_key_env": KEY_ENV,
            "relations": {"IQ-R_TA-C": 0},
        },
    }


def request(data_id: str, first: Dimension, second: Dimension) -> GenerationRequest:
    sample = Sample(
        data_id=data_id,
        task="t2i",
        prompt=f"original prompt of {data_id}",
        dimensions=(first, second),
    )
    return GenerationRequest("m", sample, 1)


CASES: list[tuple[Dimension, Dimension, str]] = [
    ("IQ-R", "TA-C", "Synergy"),
    ("TA-S", "IQ-A", "Bottleneck"),
    ("IQ-O", "TA-R", "Trade-off"),
    ("D-K", "IQ-R", "favours D-K (Knowledge) at the expense of IQ-R (Realism)"),
    ("IQ-R", "D-K", "favours D-K (Knowledge) at the expense of IQ-R (Realism)"),
    ("IQ-A", "R-T", "favours R-T (Toxicity) at the expense of IQ-A (Aesthetics)"),
    ("IQ-O", "D-A", "No clear relation"),
]


@pytest.mark.parametrize(("first", "second", "expected"), CASES)
def test_rewrite_sends_the_pairs_instruction_and_uses_the_answer(
    server: GenerationAPIServer, first: Dimension, second: Dimension, expected: str
) -> None:
    generator = rewriter(server)
    inner = generator.inner
    assert isinstance(inner, RecordingGenerator)
    (image,) = generator.generate(
        [request("X_1", first, second)], worker=0, cancel=threading.Event()
    )
    assert not isinstance(image, Exception)
    path, body = server.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "rewriter-llm"
    system, user = body["messages"]
    assert system["role"] == "system" and "text-to-image prompt" in system["content"]
    assert expected in user["content"]
    assert user["content"].endswith("original prompt of X_1")
    assert inner.prompts == ["REWRITTEN: original prompt of X_1"]
    outcome = generator.rewrites["X_1"]
    assert outcome.status == "rewritten" and outcome.error is None
    assert outcome.original == "original prompt of X_1"
    assert user["content"] == user_message(outcome.original, first, second, outcome.relation)


def test_a_stop_while_it_loads_reaches_the_inner_generator(server: GenerationAPIServer) -> None:
    # The inner generator's load is the one to cut short (a pipeline loading in a child
    # process): the stop never reached it.
    generator = rewriter(server)
    generator.stop_loading()
    assert isinstance(generator.inner, RecordingGenerator)
    assert generator.inner.stopped_loading


def test_a_stop_ends_a_rewrites_retry_wait_and_draws_none_of_the_batch(
    server: GenerationAPIServer,
) -> None:
    # The stop waited out the LLM's Retry-After (up to 300 s), then drew every image of
    # the batch; and it never reached an API generator inside.
    generator = rewriter(server)
    stopped: list[bool] = []

    def stopping_sleep(seconds: float, event: threading.Event) -> bool:
        generator.stop_waiting()  # as the engine does when a stop begins
        stopped.append(event.wait(min(seconds, 30)))
        return stopped[-1]

    generator._sleep = stopping_sleep
    server.fail_next(Fault(status=429, retry_after=600))
    batch = [request("S_1", "IQ-R", "TA-C"), request("S_2", "IQ-R", "TA-C")]
    outcomes = generator.generate(batch, worker=0, cancel=threading.Event())
    assert stopped == [True]
    assert [type(outcome) for outcome in outcomes] == [NotAsked, NotAsked]
    assert isinstance(generator.inner, RecordingGenerator)
    assert generator.inner.prompts == [] and generator.inner.stopped_waiting
    assert "S_1" not in generator.rewrites


class HearsOfWholeInputInFirstForm(RecordingGenerator):
    """An inner generator written for ``all_requested``'s first form (no argument)."""

    told = False

    def all_requested(self) -> None:  # type: ignore[override]
        self.told = True


def test_passed_over_ids_are_collected_only_when_the_inner_generator_hears_of_them(
    server: GenerationAPIServer,
) -> None:
    # dtm_rewrite overrides all_requested to pass it on: the run kept a set of every
    # passed-over data_id for it (~10 MB on a 100k resume), heard by no one.
    assert not hears_of_whole_input(rewriter(server))
    options = rewriter(server).options
    listening = DTMRewriteGenerator("m", options, HearsOfWholeInputInFirstForm())
    assert hears_of_whole_input(listening)
    tell_all_requested(listening, frozenset({"X_1"}))
    assert isinstance(listening.inner, HearsOfWholeInputInFirstForm)
    assert listening.inner.told


def test_an_empty_key_variable_means_a_server_without_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # The SDK always sends a bearer token: a keyless server takes (ignores) the placeholder.
    with GenerationAPIServer(api_key="unused") as keyless:
        generator = rewriter(keyless, api_key_env="")
        generator.generate([request("K_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert generator.rewrites["K_1"].status == "rewritten"
    with pytest.raises(FatalBackendError, match=r'OPENAI_API_KEY .*or api_key_env = ""'):
        rewriter(keyless, api_key_env="OPENAI_API_KEY")


@pytest.mark.parametrize("bad_key", ["sk-\u00e9", "sk-made-from-a-file\n"])
def test_a_key_no_header_can_carry_is_fatal_before_any_rewrite(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch, bad_key: str
) -> None:
    # It was taken: every prompt then fell back, and the note said the LLM had answered.
    monkeypatch.setenv(KEY_ENV, bad_key)
    problem = f"generator 'm': the environment variable {KEY_ENV} .* HTTP header cannot carry"
    with pytest.raises(FatalBackendError, match=problem) as loading:
        rewriter(server)
    options = DTMRewriteOptions.model_validate(
        {
            "inner": {"backend": "synthetic"},
            "model": "rewriter-llm",
            "base_url": server.base_url,
            "api_key_env": KEY_ENV,
            "relations": {"IQ-R_TA-C": 0},
        }
    )
    generator = DTMRewriteGenerator("m", options, RecordingGenerator())
    with pytest.raises(FatalBackendError, match=problem) as checked:
        generator.check_environment()  # what validate runs
    assert "sk-" not in f"{loading.value} {checked.value}"
    assert server.requests == []


def test_a_short_key_echoed_by_the_llm_is_masked_in_the_rewrite_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Keys under 4 characters were never masked: prompt_rewrite.error kept "token abc".
    monkeypatch.setenv(KEY_ENV, "abc")
    with GenerationAPIServer(api_key="abc") as short:
        short.fail_next(Fault(status=400, message="abcd refused: invalid token abc"))
        generator = rewriter(short)
        generator.generate([request("S_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert generator.rewrites["S_1"].error == "HTTP 400: abcd refused: invalid token ***"


@pytest.mark.parametrize(
    "answer",
    [f"A neon sign that reads {KEY}", f"A URL: https://x.test/?key={KEY}"],
    ids=["as-it-is", "in-a-url"],
)
def test_a_rewrite_holding_the_key_falls_back_without_it(
    server: GenerationAPIServer, answer: str
) -> None:
    # Stored in the journal and the PNG, and sent to the inner generator, unmasked.
    server.rewrite = lambda user: answer
    generator = rewriter(server)
    generator.generate([request("K_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["K_1"]
    assert outcome.status == "fallback" and outcome.prompt == outcome.original
    assert outcome.error is not None and "holds the API key" in outcome.error
    assert KEY not in repr(outcome)
    inner = generator.inner
    assert isinstance(inner, RecordingGenerator)
    assert inner.prompts == ["original prompt of K_1"]


def test_a_placeholder_key_that_is_a_word_of_the_rewrite_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A local server's placeholder key ("EMPTY", "dummy") is a word of ordinary rewrites: they
    # fell back as if they held a secret, and counted toward stopping the run.
    monkeypatch.setenv(KEY_ENV, "dummy")
    answer = "A ventriloquist on stage holding his dummy, an empty theatre behind him."
    with GenerationAPIServer(api_key="dummy") as placeholder:
        placeholder.rewrite = lambda user: answer
        generator = rewriter(placeholder)
        generator.generate([request("P_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["P_1"]
    assert (outcome.status, outcome.prompt) == ("rewritten", answer)


LLM_KEY = "sk-LLM.key+1234567"
"""A key of the rewriting LLM that a refusal quotes (``.`` and ``+`` included, which end a
sentence and escape in a URL)."""
CUT_HEAD = "I'm sorry, but I cannot rewrite this prompt with" + " at all" * 3 + " "
"""70 characters: a key after it stands across the 80th, where a refusal's quote is cut."""


@pytest.mark.parametrize(
    ("key", "refusal", "shown"),
    [
        (
            LLM_KEY,
            f"I'm sorry, but I cannot use {LLM_KEY} here.",
            "I'm sorry, but I cannot use *** here.",
        ),
        # The key across the 80th character, where the quote is cut: masked after the cut,
        # its first characters were left.
        (LLM_KEY, f"{CUT_HEAD}{LLM_KEY} in it.", f"{CUT_HEAD}***"),
        # A short key is masked where it stands as a word, as in every other message.
        ("dummy", "I'm sorry, dummy, I cannot rewrite this.", "I'm sorry, ***, I cannot"),
    ],
    ids=["quoted", "across-the-cut", "short-key"],
)
def test_a_refusal_quoting_the_key_is_stored_with_the_key_masked(
    monkeypatch: pytest.MonkeyPatch, key: str, refusal: str, shown: str
) -> None:
    # The refusal's quote held the key: in the journal, the PNG, the log and the end note.
    monkeypatch.setenv(KEY_ENV, key)
    with GenerationAPIServer(api_key=key, rewrite=lambda user: refusal) as llm:
        generator = rewriter(llm)
        generator.generate([request("R_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["R_1"]
    assert outcome.status == "fallback" and outcome.error is not None
    assert "the LLM refused to rewrite the prompt" in outcome.error and shown in outcome.error
    assert key[:5] not in outcome.error.removeprefix("the LLM refused")
    assert key[:5] not in " ".join(generator.notes())


def test_a_key_only_in_the_answers_explanation_falls_back_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Read masked, the answer's rewrite no longer shows where the key stood: an answer holding
    # it anywhere is not taken.
    monkeypatch.setenv(KEY_ENV, LLM_KEY)
    answer = f"A red kite over a beach.\n\nExplanation: I used {LLM_KEY} to rewrite it."
    with GenerationAPIServer(api_key=LLM_KEY, rewrite=lambda user: answer) as llm:
        generator = rewriter(llm)
        generator.generate([request("E_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["E_1"]
    assert outcome.status == "fallback" and outcome.error is not None
    assert "holds the API key" in outcome.error and LLM_KEY not in outcome.error


def test_a_refusal_quoting_the_key_leaves_it_nowhere_in_a_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The key was in journal.jsonl, both PNGs' text chunks, stderr and the end-of-run note.
    from tests.conftest import run_and_dataset_toml
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_OK

    monkeypatch.setenv("LLMKEY", LLM_KEY)
    refusal = f"I'm sorry, but I cannot use {LLM_KEY} here."
    with GenerationAPIServer(api_key=LLM_KEY, rewrite=lambda user: refusal) as llm:
        path = tmp_path / "run.toml"
        path.write_text(
            run_and_dataset_toml(tmp_path)
            + '[[generators]]\nname = "dtm"\nbackend = "dtm_rewrite"\n'
            "[generators.options]\n"
            f'model = "llm"\nbase_url = "{llm.base_url}"\napi_key_env = "LLMKEY"\n'
            "max_attempts = 1\n"
            'inner = { backend = "synthetic", options = { size = 16 } }\n'
            'relations = { "IQ-R_TA-C" = 1 }\n'
            '[[judges]]\nname = "trigscore"\nbackend = "fake"\n'
        )
        assert main(["run", str(path), "--headless"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "I'm sorry, but I cannot use *** here." in err  # the end-of-run note
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files)
    for piece in (LLM_KEY, LLM_KEY[:6], LLM_KEY[-8:]):
        assert piece not in out + err + caplog.text
        for file in files:
            assert piece.encode() not in file.read_bytes(), f"{file} holds the key"


def test_failure_falls_back_to_the_original_and_says_so(
    server: GenerationAPIServer, caplog: pytest.LogCaptureFixture
) -> None:
    generator = rewriter(server, max_attempts=2)
    server.fail_next(Fault(status=500), Fault(status=503), Fault(status=400))
    requests = [request("A_1", "IQ-R", "TA-C"), request("A_2", "IQ-R", "TA-C")]
    images = generator.generate(requests, worker=0, cancel=threading.Event())
    assert not any(isinstance(i, Exception) for i in images)
    inner = generator.inner
    assert isinstance(inner, RecordingGenerator)
    assert inner.prompts == ["original prompt of A_1", "original prompt of A_2"]
    first, second = generator.rewrites["A_1"], generator.rewrites["A_2"]
    assert first.status == second.status == "fallback"
    assert first.error is not None and "gave up after 2 attempts" in first.error
    assert second.error is not None and "HTTP 400" in second.error
    assert "generator 'm': rewriting A_1 failed (" in caplog.text
    assert "the original prompt is used" in caplog.text
    # Said once more at the end of the run, louder when no prompt was rewritten at all; the
    # LLM answered each request (a 5xx, a 400), so whether it is reachable is not the question.
    (note,) = generator.notes()
    assert note.startswith("2 of 2 prompts were not rewritten and kept their original text")
    assert note.endswith(
        "none was rewritten, though the LLM answered; check the generator's model and options "
        "against the failures"
    )
    generator.generate([request("A_4", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert generator.rewrites["A_4"].status == "rewritten"
    assert generator.notes()[0].startswith("2 of 3 prompts were not rewritten")
    assert "reachable" not in generator.notes()[0]
    inner.notes = lambda: ["the inner one's"]  # type: ignore[method-assign]
    assert generator.notes()[0] == "the inner one's"  # were dropped: the wrapper said nothing
    inner.notes = lambda: {"the inner one's"}  # type: ignore[method-assign,assignment,return-value]
    assert generator.notes()[0] == "the inner one's"  # a set of str was refused
    inner.notes = lambda: [b"bytes"]  # type: ignore[method-assign,list-item]
    # Its failure took the wrapper's own notes with it.
    failed, own = generator.notes()
    assert failed == (
        "its inner generator's notes() failed: TypeError: it returned an object of type bytes "
        "among its notes, where a str belongs"
    )
    assert own.startswith("2 of 3 prompts were not rewritten")
    once = rewriter(server, max_attempts=1)
    server.fail_next(Fault(status=500))
    once.generate([request("A_3", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert "(gave up after 1 attempt)" in str(once.rewrites["A_3"].error)


def test_after_a_stop_the_rest_of_the_batchs_rewrites_are_not_asked(
    server: GenerationAPIServer,
) -> None:
    # Only a wait for a retry looked at the stop: a stop that came while a rewrite was
    # being answered left each of the batch's other rewrites asked for, each up to timeout_s.
    generator = rewriter(server)

    def stopping_rewrite(user: str) -> str:
        generator.stop_waiting()  # as the engine does when a stop begins
        return default_rewrite(user)

    server.rewrite = stopping_rewrite
    batch = [request(f"S_{i}", "IQ-R", "TA-C") for i in range(1, 4)]
    outcomes = generator.generate(batch, worker=0, cancel=threading.Event())
    assert [type(outcome) for outcome in outcomes] == [NotAsked] * 3
    assert len(server.requests) == 1
    assert isinstance(generator.inner, RecordingGenerator) and generator.inner.prompts == []
    assert generator.rewrites == {} and generator.notes() == []


def recording(waits: list[float]) -> Callable[[float, threading.Event], bool]:
    """A sleep that records each wait in ``waits`` and returns at once (never cancelled)."""

    def sleep(seconds: float, cancel: threading.Event) -> bool:
        waits.append(seconds)
        return False

    return sleep


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (
            Fault(status=200, message=f"model overloaded ({KEY})"),
            "the rewriting LLM of generator 'm' sent a malformed answer (an error: model "
            "overloaded (",
        ),
        (
            Fault(status=304),
            "the rewriting LLM of generator 'm' sent a malformed answer (HTTP 304 Not "
            "Modified, which answers no POST)",
        ),
    ],
    ids=["error-with-200", "304"],
)
def test_an_error_with_200_or_a_304_is_retried_and_quoted(
    server: GenerationAPIServer, fault: Fault, reason: str
) -> None:
    # An error sent with HTTP 200 fell back at once as "the LLM's answer is malformed
    # (TypeError: 'NoneType' object is not subscriptable)", the server's words lost; a 304
    # fell back at once as a refused request ("HTTP 304: Error code: 304").
    waits: list[float] = []
    generator = rewriter(server, max_attempts=2)
    generator._sleep = recording(waits)
    server.fail_next(fault)
    generator.generate([request("E_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert generator.rewrites["E_1"].status == "rewritten" and len(waits) == 1
    server.fail_next(fault, fault)
    generator.generate([request("E_2", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["E_2"]
    assert outcome.status == "fallback" and outcome.error is not None
    assert outcome.error.startswith(reason)
    assert outcome.error.endswith("(gave up after 2 attempts)")
    assert KEY not in outcome.error and not outcome.unreached


def test_a_retry_after_with_a_5xx_is_waited_for(server: GenerationAPIServer) -> None:
    # Honoured on 429 alone: a 503 asking for 7 seconds was asked again after 1.
    waits: list[float] = []
    generator = rewriter(server, backoff_initial=0.1)
    generator._sleep = recording(waits)
    server.fail_next(Fault(status=503, retry_after=7))
    generator.generate([request("R_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert generator.rewrites["R_1"].status == "rewritten"
    assert len(waits) == 1 and waits[0] >= 7


def test_a_rewrite_a_hard_stop_ends_is_neither_stored_nor_noted(
    server: GenerationAPIServer,
) -> None:
    # Cancelled in its backoff, it was stored as a fallback "(the first failure: cancelled)"
    # and the run's end note counted it, though no image was drawn and the sample is asked
    # again on resume.
    cancel = threading.Event()
    generator = rewriter(server)

    def stopped_during(seconds: float, event: threading.Event) -> bool:
        cancel.set()  # the hard stop, while the rewrite waits to retry
        generator.stop_waiting()  # as the engine's cancel does, beside setting cancel
        return event.is_set()

    generator._sleep = stopped_during
    server.fail_next(Fault(), Fault(status=503))  # H_1 is rewritten, H_2 waits to retry
    requests = [request("H_1", "IQ-R", "TA-C"), request("H_2", "IQ-R", "TA-C")]
    images = generator.generate(requests, worker=0, cancel=cancel)
    assert [str(image) for image in images] == ["cancelled", "cancelled"]
    assert isinstance(generator.inner, RecordingGenerator) and generator.inner.prompts == []
    assert generator.rewrites == {} and generator.notes() == []
    assert generator.prompt_rewrite("H_1") is None


@pytest.mark.parametrize("stop", ["hard", "graceful"])
def test_rewrites_of_images_a_stop_cut_while_drawing_are_neither_stored_nor_noted(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    # Rewritten, then cut by the stop in the inner generator (H_1 drawn before it): the
    # rewrite of H_2 was stored, and the end note counted it, though no image was drawn from
    # it and the sample is asked again on resume.
    cancel = threading.Event()

    def stopped_while_drawing(requests: Sequence[GenerationRequest], **_: Any) -> list[Any]:
        if stop == "hard":
            cancel.set()
        cut = ItemError("cancelled") if stop == "hard" else NotAsked("stopped")
        return [draw(requests[0].seed, 8), cut]

    generator = rewriter(server)
    monkeypatch.setattr(generator.inner, "generate", stopped_while_drawing)
    server.rewrite = lambda user: ""  # each falls back: a rewrite the end note counts
    requests = [request("H_1", "IQ-R", "TA-C"), request("H_2", "IQ-R", "TA-C")]
    generator.generate(requests, worker=0, cancel=cancel)
    assert list(generator.rewrites) == ["H_1"]
    assert generator.prompt_rewrite("H_2") is None
    assert generator.notes()[0].startswith("1 of 1 prompts were not rewritten")


def test_rewrites_of_a_batch_whose_drawing_a_hard_stop_ends_in_a_raise_are_dropped(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The inner generator raised, cut by the hard stop, instead of answering per image: the
    # batch's rewrites stayed stored and the end note counted them, though its samples are
    # asked again on resume.
    cancel = threading.Event()

    def stopped_in_a_raise(requests: Sequence[GenerationRequest], **_: Any) -> list[Any]:
        cancel.set()
        raise RuntimeError("the pipeline's step callback saw the stop")

    generator = rewriter(server)
    monkeypatch.setattr(generator.inner, "generate", stopped_in_a_raise)
    server.rewrite = lambda user: ""  # each falls back: a rewrite the end note counts
    requests = [request("H_1", "IQ-R", "TA-C"), request("H_2", "IQ-R", "TA-C")]
    with pytest.raises(RuntimeError, match="saw the stop"):
        generator.generate(requests, worker=0, cancel=cancel)
    assert generator.rewrites == {} and generator.notes() == []


def test_an_llm_never_reached_stops_the_run(server: GenerationAPIServer) -> None:
    # Every rewrite fell back, every image was drawn from its original prompt and scored ok
    # under the dtm name, and the run exited 0 with a note.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    generator = rewriter(server, base_url=closed, max_attempts=1)
    with pytest.raises(
        FatalBackendError,
        match=r"rewriting LLM of generator 'm' has answered no request yet.*is it running",
    ):
        generator.generate([request("U_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert isinstance(generator.inner, RecordingGenerator)
    assert generator.inner.prompts == []


def test_an_llm_too_slow_before_any_answer_stops_the_run_saying_it_was_reached(
    server: GenerationAPIServer,
) -> None:
    # It was asked "is it running, at the address in the config?", though it was reached.
    server.fail_next(Fault(delay_s=1.0))
    generator = rewriter(server, timeout_s=0.2, max_attempts=1)
    with pytest.raises(FatalBackendError) as caught:
        generator.generate([request("U_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    message = str(caught.value)
    assert "the last reaching it but too slow" in message and "is it running" not in message
    assert "raise options.timeout_s" in message


@pytest.mark.parametrize(
    "answer",
    [lambda user: "", lambda user: user, lambda user: "Original:\nA bike"],
    ids=["empty", "echo", "echo-marker"],
)
def test_answers_with_no_rewrite_before_any_rewrite_stop_the_run(
    server: GenerationAPIServer, answer: Callable[[str], str]
) -> None:
    server.rewrite = answer
    generator = rewriter(server)
    for index in range(REFUSALS_TO_STOP - 1):
        generator.generate(
            [request(f"F_{index}", "IQ-R", "TA-C")], worker=0, cancel=threading.Event()
        )
    assert {o.status for o in generator.rewrites.values()} == {"fallback"}
    with pytest.raises(
        FatalBackendError,
        match=rf"rewrote none of the first {REFUSALS_TO_STOP} prompts it was given",
    ):
        generator.generate([request("F_last", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    # After a rewrite, a failure is its own prompt's: it falls back.
    working = rewriter(server)
    server.rewrite = lambda user: "A red bike"
    working.generate([request("W_0", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    server.rewrite = answer
    for index in range(REFUSALS_TO_STOP + 1):
        working.generate(
            [request(f"W_{index + 1}", "IQ-R", "TA-C")], worker=0, cancel=threading.Event()
        )
    assert sum(o.status == "fallback" for o in working.rewrites.values()) == REFUSALS_TO_STOP + 1


def test_answers_that_are_no_json_before_any_rewrite_stop_the_run(
    server: GenerationAPIServer,
) -> None:
    # The SDK raises JSONDecodeError on such a body: taken for the prompt's own failure
    # (an ItemError), it never counted, and every prompt of the run fell back silently.
    server.fail_next(*[Fault(not_json=True)] * REFUSALS_TO_STOP)
    generator = rewriter(server)
    for index in range(REFUSALS_TO_STOP - 1):
        generator.generate(
            [request(f"J_{index}", "IQ-R", "TA-C")], worker=0, cancel=threading.Event()
        )
    outcome = generator.rewrites["J_0"]
    assert outcome.status == "fallback" and outcome.error is not None
    assert "LLM of generator 'm' could not be read (JSONDecodeError" in outcome.error
    with pytest.raises(
        FatalBackendError,
        match=rf"rewrote none of the first {REFUSALS_TO_STOP} prompts .*JSONDecodeError",
    ):
        generator.generate([request("J_last", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())


@pytest.mark.parametrize(
    "content",
    [
        Fault(status=400, code="content_filter", message="flagged by the content filter"),
        # OpenAI's reasoning models (was the call's failure: 8 of TRIG's toxicity prompts in
        # a row stopped the run).
        Fault(
            status=400,
            code="invalid_prompt",
            message="Invalid prompt: your prompt was flagged as potentially violating our "
            "usage policy. Please try again with a different prompt: https://platform.openai.com",
        ),
        # Azure's, without its code ("retry" read as a passing failure).
        Fault(
            status=400,
            message="The response was filtered due to the prompt triggering Azure OpenAI's "
            "content management policy. Please modify your prompt and retry.",
        ),
    ],
    ids=["content_filter", "invalid_prompt", "azure-without-code"],
)
def test_a_content_filter_before_any_rewrite_does_not_stop_the_run(
    server: GenerationAPIServer, content: Fault
) -> None:
    generator = rewriter(server)
    server.fail_next(*[content] * (REFUSALS_TO_STOP + 1))
    for index in range(REFUSALS_TO_STOP + 1):
        generator.generate(
            [request(f"C_{index}", "IQ-R", "TA-C")], worker=0, cancel=threading.Event()
        )
    assert {o.status for o in generator.rewrites.values()} == {"fallback"}


@pytest.mark.parametrize(
    "refusal",
    [
        "I'm sorry, but I can't help with that request.",
        "I cannot rewrite this prompt.",
        "Unfortunately, I can't rewrite this prompt.",
    ],
)
def test_refusals_in_words_before_any_rewrite_do_not_stop_the_run(
    server: GenerationAPIServer, refusal: str
) -> None:
    # TRIG's toxicity (R-T) prompts provoke refusals by design: a dataset opening with 8 of
    # them stopped the run (exit 4) as if the LLM's options were wrong.
    generator = rewriter(server)
    server.rewrite = lambda user: refusal
    for index in range(REFUSALS_TO_STOP + 1):
        generator.generate(
            [request(f"T_{index}", "R-T", "IQ-A")], worker=0, cancel=threading.Event()
        )
    outcomes = generator.rewrites.values()
    assert {o.status for o in outcomes} == {"fallback"}
    assert all(str(o.error).startswith("the LLM refused to rewrite the prompt") for o in outcomes)
    server.rewrite = default_rewrite
    generator.generate([request("T_ok", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert generator.rewrites["T_ok"].status == "rewritten"
    # Refusals do not hide other failures: they still stop the run, counted on their own.
    mixed = rewriter(server)
    answers = iter([refusal, ""] * REFUSALS_TO_STOP)
    server.rewrite = lambda user: next(answers)
    with pytest.raises(
        FatalBackendError,
        match=rf"rewrote none of the first {REFUSALS_TO_STOP} prompts .*empty rewrite",
    ):
        for index in range(2 * REFUSALS_TO_STOP):
            mixed.generate(
                [request(f"M_{index}", "R-T", "IQ-A")], worker=0, cancel=threading.Event()
            )
    assert len(mixed.rewrites) == 2 * REFUSALS_TO_STOP - 1


@pytest.mark.parametrize(
    ("fault", "timeout_s", "reason"),
    [
        (Fault(trickle_s=30.0), 0.3, "the API timed out"),
        (Fault(oversize=True), 60.0, "the API sent an answer of more than 67,108,864 bytes"),
    ],
)
def test_an_answer_too_slow_in_all_or_too_large_falls_back(
    server: GenerationAPIServer, fault: Fault, timeout_s: float, reason: str
) -> None:
    # Each read of the trickle comes within timeout_s, so only a deadline on the whole call
    # ends it; the oversized answer is valid JSON after its 65 MiB of spaces (given the
    # time to send them, which a loaded machine may take).
    generator = rewriter(server, timeout_s=timeout_s, max_attempts=1)
    # Before any answer, a timeout would stop the run (an LLM never reached).
    generator.generate([request("S_0", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    server.fail_next(fault)
    generator.generate([request("S_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    rewrite = generator.rewrites["S_1"]
    assert rewrite.status == "fallback"
    assert rewrite.error is not None and reason in rewrite.error


def test_refusals_before_any_rewrite_stop_the_run(server: GenerationAPIServer) -> None:
    # An LLM that refuses every request (a max_tokens over its limit, say) left every image
    # drawn from its original prompt, and the run exited 0 with a note that asked whether it
    # was reachable.
    generator = rewriter(server)
    refusal = Fault(status=400, message="max_tokens is too large: 256 > 64")
    content = Fault(status=400, code="content_filter", message="flagged by the content filter")
    server.fail_next(*[refusal] * (REFUSALS_TO_STOP - 1), content)
    for index in range(REFUSALS_TO_STOP):
        generator.generate(
            [request(f"R_{index}", "IQ-R", "TA-C")], worker=0, cancel=threading.Event()
        )
    assert {o.status for o in generator.rewrites.values()} == {"fallback"}
    server.fail_next(refusal)
    message = (
        f"the rewriting LLM of generator 'm' ('rewriter-llm' at {server.base_url}) rewrote none "
        f"of the first {REFUSALS_TO_STOP} prompts it was given (the last failure: HTTP 400: "
        "max_tokens is too large: 256 > 64); check the generator's model"
    )
    with pytest.raises(FatalBackendError, match=re.escape(message)):
        generator.generate([request("R_last", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    # Once a prompt has been rewritten, a refusal is its own request's.
    working = rewriter(server)
    working.generate([request("W_0", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    server.fail_next(*[refusal] * (REFUSALS_TO_STOP + 1))
    for index in range(REFUSALS_TO_STOP + 1):
        working.generate(
            [request(f"W_{index + 1}", "IQ-R", "TA-C")], worker=0, cancel=threading.Event()
        )
    assert sum(o.status == "fallback" for o in working.rewrites.values()) == REFUSALS_TO_STOP + 1


def test_a_404_stops_the_run_until_a_rewrite_has_succeeded(server: GenerationAPIServer) -> None:
    # Before any success, a 404 is a wrong base_url or model: no prompt would be rewritten.
    generator = rewriter(server)
    server.fail_next(Fault(status=404, message="The model `rewriter-llm` does not exist"))
    with pytest.raises(FatalBackendError, match=r"rewriting LLM of generator 'm' .*base_url"):
        generator.generate([request("N_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    generator.generate([request("N_2", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert generator.rewrites["N_2"].status == "rewritten"
    server.fail_next(Fault(status=404, message="gone"))
    generator.generate([request("N_3", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["N_3"]
    assert outcome.status == "fallback" and "HTTP 404" in str(outcome.error)


def test_a_redirect_is_not_followed_and_stops_the_run(server: GenerationAPIServer) -> None:
    # The SDK's client followed it, sending the prompt on to wherever it pointed; the judge
    # never follows one.
    generator = rewriter(server)
    with GenerationAPIServer(api_key=KEY) as elsewhere:
        where = f"{elsewhere.base_url}/chat/completions?key={KEY}"
        server.fail_next(Fault(status=307, location=where))
        with pytest.raises(FatalBackendError) as caught:
            generator.generate([request("R_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
        assert elsewhere.requests == []
    assert "rewriting LLM of generator 'm' redirects (HTTP 307) to " in str(caught.value)
    assert f"{elsewhere.base_url}/chat/completions?key=***: set base_url" in str(caught.value)
    assert isinstance(generator.inner, RecordingGenerator) and generator.inner.prompts == []


def test_empty_answer_falls_back(server: GenerationAPIServer) -> None:
    server.rewrite = lambda text: '  ""  '
    generator = rewriter(server)
    generator.generate([request("B_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["B_1"]
    assert outcome.status == "fallback" and outcome.prompt == outcome.original
    assert outcome.error is not None and "empty" in outcome.error


def test_a_rewrite_holding_half_a_character_falls_back(server: GenerationAPIServer) -> None:
    # "\ud83d" in the answer's JSON (half an emoji) decodes to a lone surrogate, which UTF-8
    # cannot carry: the journal refused the judgement and the run crashed.
    server.rewrite = lambda text: "A bike \ud83d here"
    generator = rewriter(server)
    generator.generate([request("S_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["S_1"]
    assert outcome.status == "fallback" and outcome.prompt == outcome.original
    assert outcome.error is not None and "lone surrogate" in outcome.error
    outcome.error.encode("utf-8")
    server.fail_next(Fault(status=500, message="bad token \ud83d"))
    once = rewriter(server, max_attempts=1)
    once.generate([request("S_2", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    error = once.rewrites["S_2"].error
    assert error is not None and "bad token \\ud83d" in error  # its escape, storable


BICYCLE = "A red bicycle against a brick wall."


@pytest.mark.parametrize(
    "answer",
    [
        f"<think>\nOkay, a synergy. I'm sorry, I can't say more.\n</think>\n\n{BICYCLE}",
        f"Okay, the user wants a synergy ...\n</think>\n\n{BICYCLE}",  # opened by the template
        f"```\n{BICYCLE}\n```",
        f"```text\n{BICYCLE}\n```",
        f"<think>\nHmm.\n</think>\nHere is the rewritten prompt:\n```\n{BICYCLE}\n```",
    ],
    ids=["think", "think-closed-only", "fence", "fence-with-language", "think-preamble-fence"],
)
def test_a_reasoning_block_and_a_code_fence_come_off_the_rewrite(
    server: GenerationAPIServer, answer: str
) -> None:
    # The whole answer, reasoning and fences included, was recorded as the rewrite and
    # drawn (the refusal inside the reasoning aside).
    assert rewritten_prompt(answer, "stop", guidance="zzz", max_tokens=256) == BICYCLE
    server.rewrite = lambda user: answer
    generator = rewriter(server)
    generator.generate([request("T_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["T_1"]
    assert (outcome.status, outcome.prompt) == ("rewritten", BICYCLE)


def test_a_reasoning_block_never_closed_is_no_rewrite() -> None:
    thinking = "<think>\nOkay, the user wants a red bicycle, so"
    with pytest.raises(ItemError, match=re.escape("answer is a <think> block never closed")):
        rewritten_prompt(thinking, "stop", guidance="zzz", max_tokens=256)
    with pytest.raises(ItemError, match=re.escape("cut at max_tokens (256)")):
        rewritten_prompt(thinking, "length", guidance="zzz", max_tokens=256)
    # A fence inside the answer, not around the whole of it, stays.
    inside = f"{BICYCLE}\n```\nred\n```"
    assert rewritten_prompt(inside, "stop", guidance="zzz", max_tokens=256) == inside
    # Reasoning closed, then cut before any rewrite: cut, not "an empty rewrite".
    closed = "<think>\nOkay, a red bicycle.\n</think>\n"
    with pytest.raises(ItemError, match=re.escape("cut at max_tokens (256)")):
        rewritten_prompt(closed, "length", guidance="zzz", max_tokens=256)


NEVER_CLOSED = "never closed"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # Reasoning, each tag where a reasoning model writes it: the rewrite follows.
        (f"<think>\nOkay, reasoning.\n</think>\n\n{BICYCLE}", BICYCLE),
        (f"<think>Okay, reasoning.</think>\n\n{BICYCLE}", BICYCLE),
        (f"<think></think>\n\n{BICYCLE}", BICYCLE),
        (f"<think>\n\n</think>\n\n{BICYCLE}", BICYCLE),  # Qwen3 not thinking
        (f"<think>\nreasoning here.</think>\n\n{BICYCLE}", BICYCLE),
        (f"<think>\nreasoning\n</think> {BICYCLE}", BICYCLE),
        (f"<think>Okay, reasoning\nmore\n</think>\n\n{BICYCLE}", BICYCLE),
        (f"<think>\r\nOkay, reasoning\r\n</think>\r\n\r\n{BICYCLE}", BICYCLE),
        (f"<think>\n  reasoning\n\t</think>  \n\n{BICYCLE}", BICYCLE),
        (f"<THINK>\nreasoning\n</THINK>\n{BICYCLE}", BICYCLE),
        (f"<think>\na\n</think>\n<think>\nb\n</think>\n{BICYCLE}", BICYCLE),
        # Opened by DeepSeek-R1's chat template: the closing tag alone.
        (f"reasoning here.</think>\n\n{BICYCLE}", BICYCLE),
        (f"reasoning here.\n</think>\n{BICYCLE}", BICYCLE),
        (f"reasoning here.\r\n  </think>\t\r\n{BICYCLE}", BICYCLE),
        (f"reasoning here.</think>\n\n<think>\nmore\n</think>\n{BICYCLE}", BICYCLE),
        # Reasoning never closed, by a tag that counts or by any: no rewrite, never drawn.
        ("<think>Okay, reasoning more and more", NEVER_CLOSED),
        ("<think>\nOkay, reasoning\nmore", NEVER_CLOSED),
        (f"<think>\na\n</think>\n<think>\nb {BICYCLE}", NEVER_CLOSED),
        (f"<think>Okay.</think> {BICYCLE}", NEVER_CLOSED),
        # An answer opening with the tag reads as reasoning (the prompt falls back to its
        # original rather than drawing what may be the LLM's thoughts).
        ("<think> written in chalk on a blackboard, a classroom at dusk", NEVER_CLOSED),
        ("<think> and </think> tags glowing on a terminal screen", NEVER_CLOSED),
        # A prompt that mentions the tags in a sentence keeps its text.
        ("A neon sign reading </think> above a bar door, cyberpunk", None),
        ("A sign reading </think> on a wall", None),
        ("A sign reading </think> next to a sign reading <think>", None),
        ("A red bicycle leaning on a wall,\n<think>\nneon letters\nat dusk", None),
        # Without an opening tag, a </think> ending or starting a line among the prompt's own
        # lines is its text too (11f6a9c cut before it, or left an empty rewrite).
        ("A neon sign that reads </think>\nBelow it, a cat sleeps on a red bicycle.", None),
        ("A poster with the text </think>", None),
        ("A chalkboard covered in HTML tags like <div> and </think>", None),
        ("A red bicycle.\n</think> written in chalk below it.", None),
        ("A screen showing the tags <think> and\n</think> in green monospace font", None),
        ("A chalkboard reading\n</think>", None),  # the cut would leave nothing
        ("reasoning here.</think>", None),  # R1's layout and a sign's alike: kept whole
    ],
)
def test_a_reasoning_block_comes_off_in_every_layout(answer: str, expected: str | None) -> None:
    # 90ee7f5 took tags only on lines of their own: "<think>Okay.</think>\n\nA red bicycle",
    # "<think></think>\n\n..." and R1's "reasoning.</think>\n\n..." were drawn whole, and
    # "<think>\nreasoning\n</think> A red ..." failed as never closed.
    if expected is None or expected == BICYCLE:
        assert rewritten_prompt(answer, "stop", guidance="zzz", max_tokens=256) == (
            expected or answer
        )
        return
    with pytest.raises(ItemError, match=re.escape(expected)):
        rewritten_prompt(answer, "stop", guidance="zzz", max_tokens=256)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("I'm sorry, but I can't help with that request.", "the LLM refused to rewrite"),
        ("I cannot rewrite this prompt.", "the LLM refused to rewrite"),
        ("Sorry, that is not something I can do.", "the LLM refused to rewrite"),
        ("As an AI, I must decline.", "the LLM refused to rewrite"),
        ("I cannot generate a prompt that depicts violence.", "the LLM refused to rewrite"),
        ("{user}", "repeats the request's guidance"),  # the whole request echoed
        ("Original:\nA bike by a wall", "repeats the request's guidance"),
        ("Sure! Here is the rewritten prompt:", "empty rewrite"),  # a preamble and nothing
    ],
    ids=[
        "sorry",
        "cannot",
        "sorry-comma",
        "as-an-ai",
        "cannot-generate",
        "echo-all",
        "echo-marker",
        "preamble-only",
    ],
)
def test_a_refusal_or_an_echo_is_no_rewrite(
    server: GenerationAPIServer, answer: str, reason: str
) -> None:
    # Each was taken as the rewritten prompt, and an image drawn from it.
    server.rewrite = lambda user: answer.replace("{user}", user)
    generator = rewriter(server)
    generator.generate([request("E_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["E_1"]
    assert outcome.status == "fallback" and outcome.prompt == outcome.original
    assert outcome.error is not None and reason in outcome.error


@pytest.mark.parametrize(
    "answer",
    [
        "Sure! Here is the rewritten prompt:\n\nA red bike against a brick wall",
        "Here's a revised version: A red bike against a brick wall",
        'Rewritten prompt:\n"A red bike against a brick wall"',
    ],
)
def test_a_preamble_line_is_taken_off_the_rewrite(server: GenerationAPIServer, answer: str) -> None:
    server.rewrite = lambda user: answer
    generator = rewriter(server)
    generator.generate([request("P_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["P_1"]
    assert outcome.status == "rewritten" and outcome.prompt == "A red bike against a brick wall"


REFUSALS = [
    "I apologize, but I can't help with rewriting this prompt.",
    "Unfortunately, I can't rewrite this prompt.",
    "I'm afraid I can't do that.",
    "My apologies, but I must decline.",
    "Regrettably, I can't help with that request.",
    "Apologies, but I cannot assist with this.",
    "I can't do that for you.",
    "I can't.",
    "I must respectfully decline this request.",
    # Each was recorded as rewritten: a refusal to make a prompt or an image, of the policy,
    # or after a clause of its own.
    "I cannot generate a prompt that depicts violence.",
    "I can't create that image prompt.",
    "I cannot provide that.",
    "Unfortunately, this prompt violates our content policy.",
    "This request violates my guidelines, so I can't rewrite it.",
]


@pytest.mark.parametrize("answer", REFUSALS)
def test_a_refusal_in_other_words_is_no_rewrite(answer: str) -> None:
    # Each was recorded as rewritten, and its image drawn from the refusal.
    with pytest.raises(ItemError, match="the LLM refused to rewrite the prompt"):
        rewritten_prompt(answer, "stop", guidance="G", max_tokens=256)


OWN_FIRST_CLAUSES = [
    # A hyphen goes on with the word: no refusal opens so.
    "Sorry-looking puppy in the rain, soft light.",
    "As an AI-generated portrait of a sailor, weathered face, oil paint texture.",
    "Here is Venice reimagined as a futuristic version of itself, floating above the clouds: "
    "gondolas glide between glass towers.",
    "Here are the ruins of Pompeii with a museum-style description panel in the foreground: "
    "ash-grey streets, a red sunset.",
    "Here is the new version of the phone, lying on a desk: soft studio light.",
    "Your updated description: a serene zen garden, written on a wooden sign by the gate.",
    "A cat and a dog.\n\nChanges made to the garden: tulips bloom along the fence.",
    "A sign reading:\n\nNote: closed today, in red letters.",
    "Unfortunately for the knight, the dragon has already eaten the castle: a comic-book "
    "scene in bold colours.",
    "Apologies written on a chalkboard in an empty classroom, chalk dust in the light.",
    "I must decline the invitation, says a card held by a butler in a grand hall.",
    "A poster that says 'I can't help you with that' on a brick wall.",
    "'I can't help you with that,' says a robot behind a help desk.",
    "I won't forget this sunset: a couple on a pier under an orange sky.",
    "I can't stop smiling: a child holding a balloon in a sunlit park.",
    "Unfortunately for the knight, this prompt of a dragon is a comic-book scene.",
    "I can't make it home tonight, says a note on a kitchen table.",
    "Here is a prompt that went wrong: a robot painting a wall in the wrong colour.",
    "Here is the prompt of the day: a lighthouse at dusk.",
    "The new prompter at the theatre: a young actor reading lines by candlelight.",
]
"""Genuine prompts that open like a preamble, a refusal or an afterword would."""

PREAMBLES_ENDING_THEIR_LINE = [
    "Here's a rewritten version of the prompt that strengthens the synergy between realism "
    "and composition:\n",
    "Here is an improved prompt that balances both dimensions:",
    "Here's a prompt that emphasizes both dimensions:",
    "Here is the prompt:",
    "Here's the prompt rewritten:",
    "**Here is your revised prompt, which keeps both dimensions:**",
]
"""Preambles whose colon ends the line, the prompt following on the next."""


@pytest.mark.parametrize(
    ("answer", "prompt"),
    [
        ("Sure!\n\nHere is the rewritten prompt:\n\nA red bicycle", "A red bicycle"),
        ("**Rewritten prompt:** A red bicycle", "A red bicycle"),
        ("**Improved prompt**: A red bicycle", "A red bicycle"),
        ("## Improved Prompt\n\nA red bicycle", "A red bicycle"),
        ("Here is the revised text: A red bicycle", "A red bicycle"),
        ("Rewritten prompt:\nA red bicycle.\n\nExplanation: red stands out.", "A red bicycle."),
        ("A red bicycle.\n\n**Note:** the wall is kept.", "A red bicycle."),
        # A first clause of the prompt's own is no preamble, nor is a first-person line in it.
        (
            "An improved text layout: a poster reading SALE",
            "An improved text layout: a poster reading SALE",
        ),
        (
            "Here is a neon sign with the text: OPEN",
            "Here is a neon sign with the text: OPEN",
        ),
        ("A poster: I can't help falling in love", "A poster: I can't help falling in love"),
        ("A bike.\n\nA note: on the wall", "A bike.\n\nA note: on the wall"),
        ("Here's a revised version of your prompt: A red bicycle", "A red bicycle"),
        ("Certainly, here is an improved version:\nA red bicycle", "A red bicycle"),
        ("A red bicycle\n\nRationale: it stands out.", "A red bicycle"),
        # Each was returned whole, its preamble or afterword included: a clause after the
        # keyword, a plain "the prompt", a revision word after it, a label with an article.
        *[
            (f"{preamble}\nA red fox in snow.", "A red fox in snow.")
            for preamble in PREAMBLES_ENDING_THEIR_LINE
        ],
        ("The new prompt: a cat.", "a cat."),
        ("A red fox in snow.\n\nChanges made: added realism.", "A red fox in snow."),
        ("A red fox in snow.\n\n**Changes:** added realism.", "A red fox in snow."),
        # Each was cut or refused: a keyword of the preamble's in the prompt's first clause,
        # words that open a refusal or first person that is the prompt's own.
        *[(prompt, prompt) for prompt in OWN_FIRST_CLAUSES],
    ],
    ids=[
        "interjection-line",
        "bold",
        "bold-before-colon",
        "heading",
        "revised-text",
        "explanation",
        "note",
        "first-clause",
        "here-is-in-prompt",
        "first-person-in-prompt",
        "note-in-prompt",
        "revised-version-of-your-prompt",
        "improved-version-line",
        "rationale",
        *[f"line-{index}" for index in range(len(PREAMBLES_ENDING_THEIR_LINE))],
        "the-new-prompt",
        "changes-made",
        "changes",
        *[f"own-{index}" for index in range(len(OWN_FIRST_CLAUSES))],
    ],
)
def test_a_preamble_and_an_explanation_come_off_the_rewrite_alone(answer: str, prompt: str) -> None:
    assert rewritten_prompt(answer, "stop", guidance="G", max_tokens=256) == prompt


@pytest.mark.parametrize(
    ("answer", "prompt"),
    [
        ('"A red bicycle"', "A red bicycle"),
        ("'A knight's sword'", "A knight's sword"),  # an apostrophe is no closing quote
        ('Rewritten prompt:\n"A red bicycle"', "A red bicycle"),
        # The first and last of several quoted phrases: the prompt's own quotes.
        (
            '"Welcome" written on a doormat beside a sign that says "Exit"',
            '"Welcome" written on a doormat beside a sign that says "Exit"',
        ),
        (
            "'Open' on a door, a sign that says 'Closed'",
            "'Open' on a door, a sign that says 'Closed'",
        ),
        # Its opening quote taken off, it read as a refusal, and every prompt fell back.
        (
            '"I can\'t help you with that," says a robot holding a sign that reads "Closed"',
            '"I can\'t help you with that," says a robot holding a sign that reads "Closed"',
        ),
        # Quotes of the prompt's own inside one pair around the whole answer.
        (
            '"A neon sign reading "OPEN" above a bakery door"',
            'A neon sign reading "OPEN" above a bakery door',
        ),
        ("'The knights' shields gleam'", "The knights' shields gleam"),
        ("'A jukebox playing rock 'n' roll'", "A jukebox playing rock 'n' roll"),
    ],
    ids=[
        "double",
        "single-apostrophe",
        "after-preamble",
        "two-phrases",
        "two-single",
        "robot",
        "quoted-inside",
        "plural-possessive",
        "rock-n-roll",
    ],
)
def test_quotes_come_off_only_when_they_wrap_the_whole_rewrite(answer: str, prompt: str) -> None:
    assert rewritten_prompt(answer, "stop", guidance="G", max_tokens=256) == prompt


class _Untouchable:
    """Stands in for a pattern that must not run."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a pattern ran ({name}) over an answer too long to read")


def test_an_answer_far_too_long_is_refused_before_any_pattern_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A megabyte of blank lines held the worker thread (and the GIL) for hours.
    for pattern in ("PREAMBLE", "AFTERWORD", "ECHO", "REFUSAL", "REFUSAL_IN_FIRST_SENTENCE"):
        monkeypatch.setattr(rewrite_answers, pattern, _Untouchable())
    answer = "A cat on a mat." + "\n" * 1_000_000 + "A dog sits."
    with pytest.raises(ItemError, match="is 1,000,026 characters long"):
        rewritten_prompt(answer, "stop", guidance="G", max_tokens=256)


def test_blanks_around_an_answer_do_not_make_it_too_long_nor_hide_a_cut() -> None:
    # The early refusal counted the blanks around an answer, and named a cut answer too long.
    rewrite = "A red cube on a blue sphere."
    assert rewritten_prompt(rewrite + " " * 17_000, "stop", guidance="G", max_tokens=256) == (
        rewrite
    )
    with pytest.raises(ItemError, match=r"cut at max_tokens \(256\)"):
        rewritten_prompt("word " * 4_000, "length", guidance="G", max_tokens=256)


@pytest.mark.timeout(120)  # linear: milliseconds; quadratic (as they were): hours
@pytest.mark.parametrize(
    "answer",
    [
        "Sure!" + "\n" * 100_000 + "A dog sits.",
        "**" + " \n" * 100_000 + "A dog sits.",
        "A cat on a mat." + "\n" * 100_000 + "A dog sits.",
        "A cat on a mat.\n\n" + "*\n" * 100_000,
        "A cat." + " \t\n" * 100_000 + "Original: x",
    ],
    ids=["interjection", "markdown", "blank-lines", "markdown-lines", "echo"],
)
def test_the_answer_patterns_are_linear_in_blank_lines(answer: str) -> None:
    assert rewrite_answers.PREAMBLE.match(answer) is None
    assert rewrite_answers.AFTERWORD.sub("", answer) == answer
    assert rewrite_answers.ECHO.search(answer) is None


def test_an_answer_its_content_filter_stopped_falls_back(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = rewriter(server)
    answer = SimpleNamespace(
        message=SimpleNamespace(content="A bike"), finish_reason="content_filter"
    )
    completions = generator._client.chat.completions
    monkeypatch.setattr(completions, "create", lambda **_: SimpleNamespace(choices=[answer]))
    generator.generate([request("F_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["F_1"]
    assert outcome.status == "fallback" and outcome.error == (
        "the LLM's content filter stopped its rewrite"
    )


@pytest.mark.parametrize("choices", [None, {"0": "a table"}], ids=["null", "table"])
def test_an_answer_of_the_wrong_shape_falls_back(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch, choices: object
) -> None:
    # "choices": null (TypeError) or a table (KeyError) stopped the run, as a broken
    # generator, after four samples.
    generator = rewriter(server)
    completions = generator._client.chat.completions
    monkeypatch.setattr(completions, "create", lambda **_: SimpleNamespace(choices=choices))
    generator.generate([request("B_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["B_1"]
    assert outcome.status == "fallback" and outcome.prompt == outcome.original
    assert outcome.error is not None and outcome.error.startswith("the LLM's answer is malformed")


@pytest.mark.parametrize(
    ("finish_reason", "content", "reason"),
    [
        ("length", "A rewrite cut in the mid", "cut at max_tokens (256)"),
        ("stop", "x" * 5000, "is 5,000 characters long"),
    ],
)
def test_a_cut_or_overlong_rewrite_falls_back(
    server: GenerationAPIServer,
    monkeypatch: pytest.MonkeyPatch,
    finish_reason: str,
    content: str,
    reason: str,
) -> None:
    generator = rewriter(server)
    answer = SimpleNamespace(message=SimpleNamespace(content=content), finish_reason=finish_reason)
    completions = generator._client.chat.completions
    monkeypatch.setattr(completions, "create", lambda **_: SimpleNamespace(choices=[answer]))
    generator.generate([request("B_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    outcome = generator.rewrites["B_1"]
    assert outcome.status == "fallback" and outcome.prompt == outcome.original
    assert outcome.error is not None and reason in outcome.error


def test_refused_credentials_stop_the_run(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "wrong-key-value")
    generator = rewriter(server)
    with pytest.raises(FatalBackendError) as caught:
        generator.generate([request("C_1", "IQ-R", "TA-C")], worker=0, cancel=threading.Event())
    assert "wrong-key-value" not in str(caught.value)
    # "the API refused the credentials" named neither the generator nor which API: the
    # inner generator may call an API too.
    assert str(caught.value).startswith(
        "the rewriting LLM of generator 'm' refused the credentials (HTTP 401: "
    )
    assert "api_key_env" in str(caught.value)


def test_options_need_relations_and_valid_inner_options(tmp_path: Path) -> None:
    base = {"inner": {"backend": "synthetic"}, "model": "m"}
    with pytest.raises(ValidationError, match="relations"):
        DTMRewriteOptions.model_validate(base)
    with pytest.raises(ValidationError, match="inner synthetic options"):
        DTMRewriteOptions.model_validate(
            {
                **base,
                "relations": {"IQ-R_TA-C": 0},
                "inner": {"backend": "synthetic", "options": {"size": 2}},
            }
        )
    with pytest.raises(ValidationError, match="unknown backend"):
        DTMRewriteOptions.model_validate(
            {**base, "relations": {"IQ-R_TA-C": 0}, "inner": {"backend": "nope"}}
        )


def folder_refused(inner: str) -> str:
    """The refusal of an inner generator named ``inner`` that draws nothing from the prompt."""
    return (
        f"generator 'g': its {inner} serves images made elsewhere, not from the prompt it is "
        "given: there is nothing to rewrite; use it without dtm_rewrite"
    )


def nested_refused(inner: str) -> str:
    """The refusal of an inner generator named ``inner`` that is a dtm_rewrite itself."""
    return (
        f"generator 'g': its {inner} is a dtm_rewrite itself: one rewrite is made per prompt; "
        "give the inner one's inner generator here instead"
    )


def test_images_made_elsewhere_have_no_prompt_to_rewrite(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # Around an image folder, each prompt cost an LLM call and every judgement recorded a
    # rewrite its image was never drawn from.
    options = {
        "model": "m",
        "relations": {"IQ-R_TA-C": 1},
        "inner": {"backend": "image_folder", "options": {"path": str(tmp_path)}},
    }
    config = make_config(generators=[{"name": "g", "backend": "dtm_rewrite", "options": options}])
    # Named as the config names it (was its Python class, ImageFolderGenerator).
    with pytest.raises(
        ConfigError, match=re.escape(folder_refused("inner backend 'image_folder'"))
    ):
        build_generator(config.generators[0], config)


def test_a_rewrite_around_a_rewrite_is_refused(make_config: ConfigFactory, tmp_path: Path) -> None:
    # The images API was sent the outer rewrite of the inner one's rewrite, while the journal
    # recorded the inner one's prompt.
    inner = {"model": "m2", "relations": {"IQ-R_TA-C": 0}, "inner": {"backend": "synthetic"}}
    options = {
        "model": "m",
        "relations": {"IQ-R_TA-C": 1},
        "inner": {"backend": "dtm_rewrite", "options": inner},
    }
    config = make_config(generators=[{"name": "g", "backend": "dtm_rewrite", "options": options}])
    with pytest.raises(ConfigError, match=re.escape(nested_refused("inner backend 'dtm_rewrite'"))):
        build_generator(config.generators[0], config)


def test_an_inner_instance_is_checked_as_the_configs_inner_entry_is(tmp_path: Path) -> None:
    # Passed to the engine, a wrapper around an image folder or another rewrite was taken
    # (the README says instances are checked as the config's entries are).
    options = DTMRewriteOptions.model_validate(
        {"inner": {"backend": "synthetic"}, "model": "m", "relations": {"IQ-R_TA-C": 0}}
    )
    folder = ImageFolderGenerator("g", ImageFolderOptions(path=tmp_path))
    refused = folder_refused("inner generator, ImageFolderGenerator,")
    with pytest.raises(ConfigError, match=re.escape(refused)):
        DTMRewriteGenerator("g", options, folder)
    nested = DTMRewriteGenerator("g", options, RecordingGenerator())
    refused = nested_refused("inner generator, DTMRewriteGenerator,")
    with pytest.raises(ConfigError, match=re.escape(refused)):
        DTMRewriteGenerator("g", options, nested)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_rewriting_through_the_engine(
    make_config: ConfigFactory, server: GenerationAPIServer, tmp_path: Path
) -> None:
    server.rewrite = lambda text: f"{default_rewrite(text)}, café crème ☕"  # stored in a PNG
    report = write_report(tmp_path / "relationship_codes.csv")
    config = make_config(
        samples=8,
        generators=[
            {
                "name": "synth_dtm",
                "backend": "dtm_rewrite",
                "batch_size": 2,
                "options": {
                    "inner": {"backend": "synthetic", "options": {"size": 16}},
                    "model": "rewriter-llm",
                    "base_url": server.base_url,
                    "api_key_env": KEY_ENV,
                    "report": str(report),
                    "relations": {"IQ-A_TA-S": 3},
                },
            }
        ],
    )
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
    assert {j.status for j in results} == {"ok"} and len(results) == 16
    generator = engine._generators[0]
    assert isinstance(generator, DTMRewriteGenerator)
    assert generator.batch_size == 2 and generator.inner.batch_size == 2
    assert len(generator.rewrites) == 8
    assert generator.rewrites["IQ-R_TA-C_1"].relation == -2  # from the report
    assert generator.rewrites["IQ-A_TA-S_1"].relation == 3  # from the config
    assert {o.status for o in generator.rewrites.values()} == {"rewritten"}
    fingerprint = generator.fingerprint()
    assert fingerprint["inner"]["backend"] == "synthetic"
    assert fingerprint["relations"]["IQ-A_TA-S"] == 3
    # Resumed with the images on disk (the journal lost here, as a crash between writing an
    # image and judging it loses that image's judgements): each reused image keeps the
    # rewrite it was drawn from, and no prompt is rewritten again. The records read "no
    # rewrite" before.
    first = {(j.data_id, j.dimension): j.prompt_rewrite for j in results}
    chats = sum(path.endswith("/chat/completions") for path, _ in server.requests)
    (engine.run_dir_path / "journal.jsonl").unlink()
    async with Engine(config) as again:
        resumed = [j async for j in again.results]
    assert len(resumed) == 16 and all(j.prompt_rewrite is not None for j in resumed)
    assert {(j.data_id, j.dimension): j.prompt_rewrite for j in resumed} == first
    assert sum(path.endswith("/chat/completions") for path, _ in server.requests) == chats


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_error_records_of_a_failed_picture_keep_its_rewrite(
    make_config: ConfigFactory, server: GenerationAPIServer
) -> None:
    # The inner generator fails the rewritten sample: its error judgements said nothing of
    # the rewrite (prompt_rewrite None), though the README says every judgement records it.
    inner = {"backend": "synthetic", "options": {"fail_ids": ["IQ-R_TA-C_1"]}}
    config = make_config(samples=2, generators=[synthetic_rewriter(server, inner)])
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
    failed = [j for j in results if j.data_id == "IQ-R_TA-C_1"]
    assert len(failed) == 2 and {j.status for j in failed} == {"error"}
    assert {j.error_stage for j in failed} == {"generate"}
    for judgement in failed:
        assert judgement.prompt_rewrite is not None
        assert judgement.prompt_rewrite.status == "rewritten"
        assert judgement.prompt_rewrite.prompt.startswith("REWRITTEN: ")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_rewrite_holding_half_a_character_is_stored_as_a_fallback(
    make_config: ConfigFactory, server: GenerationAPIServer
) -> None:
    # The run crashed writing the journal, and a resumed run read the image's rewrite as none.
    server.rewrite = lambda text: "A bike \ud83d here"
    inner = {"backend": "synthetic", "options": {"size": 16}}
    config = make_config(samples=4, generators=[synthetic_rewriter(server, inner)])
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
    assert len(results) == 8 and {j.status for j in results} == {"ok"}
    assert all(j.prompt_rewrite is not None for j in results)
    assert {j.prompt_rewrite.status for j in results if j.prompt_rewrite} == {"fallback"}
    (engine.run_dir_path / "journal.jsonl").unlink()
    async with Engine(config) as again:
        resumed = [j async for j in again.results]
    assert {j.prompt_rewrite for j in resumed} == {j.prompt_rewrite for j in results}


def test_a_bad_relation_is_reported_at_its_own_key_and_line_beside_other_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The codes were checked once the whole options had validated: one bad temperature hid
    # them, and alone they were reported at the [generators.options] header, keyless.
    from tests.conftest import run_and_dataset_toml
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_CONFIG

    path = tmp_path / "run.toml"
    path.write_text(
        run_and_dataset_toml(tmp_path) + '[[generators]]\nname = "g"\nbackend = "dtm_rewrite"\n'
        "[generators.options]\n"
        'model = "m"\n'
        'inner = { backend = "synthetic" }\n'
        'relations = { "IQ-R_TA-C" = 7, "XX_TA-C" = 1 }\n'
        "temperature = 5\n"
        '[[judges]]\nbackend = "fake"\n'
    )
    assert main(["validate", str(path)]) == EXIT_CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert "run.toml:12: generators[0].options.relations.IQ-R_TA-C: relation code 7 is not" in err
    assert "run.toml:12: generators[0].options.relations.XX_TA-C: unknown dimension 'XX'" in err
    assert "run.toml:13: generators[0].options.temperature:" in err


@pytest.mark.parametrize(
    ("report", "refused"),
    [
        # The *_dtm_dim setup: the base model's DTM from the same run's report, which the
        # run writes again at its end (its relations then changed the generator's
        # fingerprint, and the run refused its own re-run, exit 3).
        ("runs/r/report/syn/relationship_codes.csv", True),
        ("runs/r/relationship_codes.csv", True),
        ("linked/report/syn/relationship_codes.csv", True),  # through a link to the run dir
        # Another run's report (one --new-run made beside it among them) is never written by
        # this run.
        ("runs/base/report/syn/relationship_codes.csv", False),
        ("runs/r-2/report/syn/relationship_codes.csv", False),
    ],
)
def test_a_report_in_the_runs_own_run_directory_is_refused_at_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report: str, refused: bool
) -> None:
    from tests.conftest import run_and_dataset_toml
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_CONFIG, EXIT_OK

    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "linked").symlink_to(tmp_path / "runs" / "r")
    (tmp_path / report).parent.mkdir(parents=True, exist_ok=True)
    write_report(tmp_path / report)
    path = tmp_path / "run.toml"
    path.write_text(
        run_and_dataset_toml(tmp_path)
        + '[[generators]]\nname = "syn"\nbackend = "synthetic"\n'
        + '[[generators]]\nname = "rw"\nbackend = "dtm_rewrite"\n'
        + "[generators.options]\n"
        + 'model = "m"\n'
        + 'api_key_env = ""\n'
        + 'inner = { backend = "synthetic" }\n'
        + f'report = "{report}"\n'
        + '[[judges]]\nbackend = "fake"\n'
    )
    if not refused:
        assert main(["validate", str(path)]) == EXIT_OK
        return
    for command in (["validate"], ["run", "--headless", "--no-report"]):
        assert main([*command, str(path)]) == EXIT_CONFIG
        err = " ".join(capsys.readouterr().err.split())
        where = (tmp_path / report).resolve()
        assert f"run.toml:16: generators[1].options.report: {where}: lies in " in err
        assert f"this run's own run directory ({tmp_path / 'runs' / 'r'})" in err
        assert "copy the file out of the run directory" in err
    assert not (tmp_path / "runs" / "r" / "journal.jsonl").exists()  # refused before a run
