"""Config validation: every problem is refused before work starts, with file, line and key."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import annotated_types
import pytest
from pydantic import BaseModel, ValidationError, model_validator

from trig_stream.backends import registry
from trig_stream.config import EngineSection, load_config
from trig_stream.config_problems import dotted_key, locate_key, nested_problems
from trig_stream.errors import ConfigError, MissingExtraError
from trig_stream.testing import SyntheticGenerator

GOOD = """\
[run]
name = "demo"
task = "sub"

[dataset]
path = "prompts.json"
pairs = ["TA-C_IQ-R"]

[[generators]]
name = "one"
backend = "synthetic"

[[generators]]
name = "two"
backend = "synthetic"
options = { size = 32 }

[[judges]]
backend = "fake"
"""


def write(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults_and_resolved_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.run.task == "s2p"  # upstream's "sub" is accepted
    assert config.dataset.path == (tmp_path / "prompts.json").resolve()
    assert config.run_dir == (tmp_path / "runs" / "demo").resolve()
    assert config.relation.synergy == 0.8 and config.relation.tradeoff_corr == 0.6
    assert [g.name for g in config.generators] == ["one", "two"]
    assert config.judges[0].name == "trigscore" and config.judges[0].scorer == "robust"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("[run]\n", "[run]\ncolour = 'red'\n"),
            r"run\.toml:2: run\.colour: unknown key; this table takes: name, output_dir, task",
        ),
        (
            ("[run]\n", "[run]\nout_dir = 'x'\n"),
            r"run\.out_dir: unknown key; did you mean 'output_dir'\?",
        ),
        (
            ("[dataset]\n", "[relation]\nsynergy = nan\n\n[dataset]\n"),
            r"run\.toml:6: relation\.synergy: Input should be a finite number",
        ),
        (
            ("[dataset]\n", "[relation]\nsynergy = 2\n\n[dataset]\n"),
            r"run\.toml:6: relation\.synergy: Input should be less than or equal to 1",
        ),
        (
            ("[dataset]\n", "[relation]\nbottleneck = 0.9\n\n[dataset]\n"),
            r"relation: .*bottleneck \(0\.9\) is above synergy \(0\.8\)",
        ),
        (
            ("[dataset]\n", "[engine]\nbackoff_max = inf\n\n[dataset]\n"),
            r"engine\.backoff_max: Input should be a finite number",
        ),
        (("[dataset]\n", "[runn]\n"), r"runn: unknown key; did you mean 'run'\?"),
        # The openai judge's options and its serve table: no infinity sent as JSON Infinity.
        *(
            (
                ('backend = "fake"', f'backend = "openai"\noptions = {{ {options} }}'),
                rf"judges\[0\]\.options\.{key}: Input should be a finite number",
            )
            for key, options in [
                ("temperature", 'model = "m", base_url = "http://h/v1", temperature = inf'),
                ("timeout_s", 'model = "m", base_url = "http://h/v1", timeout_s = inf'),
                (
                    r"serve\.ready_timeout_s",
                    'model = "m", serve = { command = ["vllm"], ready_timeout_s = inf }',
                ),
            ]
        ),
        # Every backend's options: no NaN or infinity (a latency of inf waits forever).
        (
            ("options = { size = 32 }", "options = { size = 32, latency_s = inf }"),
            r"generators\[1\]\.options\.latency_s: Input should be a finite number",
        ),
        (
            ('backend = "fake"', 'backend = "fake"\noptions = { latency_s = nan }'),
            r"judges\[0\]\.options\.latency_s: Input should be a finite number",
        ),
        (
            ('backend = "fake"', 'backend = "fake"\nadaptive = { enabeld = true }'),
            r"judges\[0\]\.adaptive\.enabeld: unknown key; did you mean 'enabled'\?",
        ),
        (
            ('name = "two"\n', 'name = "two\\n"\n'),  # a newline at its end: a folder's name
            r"generators\[1\]\.name: must start with a letter or digit",
        ),
        (
            ('name = "two"\n', 'name = "two"\nworkers = "many"\n'),
            r"run\.toml:15: generators\[1\]\.workers: .*integer",
        ),
        (
            ("options = { size = 32 }", "options = { size = 'big' }"),
            r"run\.toml:16: generators\[1\]\.options\.size: .*integer",
        ),
        (
            ("options = { size = 32 }", "options = { sise = 32 }"),
            r"generators\[1\]\.options\.sise: unknown key; did you mean 'size'\?",
        ),
        (
            ('backend = "fake"', 'backend = "oracle"'),
            r"run\.toml:19: judges\[0\]\.backend: unknown backend 'oracle'",
        ),
        (('task = "sub"', 'task = "video"'), r"run\.toml:3: run\.task: .*unknown task"),
        (('pairs = ["TA-C_IQ-R"]', 'pairs = ["TA-C_XX-Y"]'), r"dataset\.pairs\[0\].*XX-Y"),
        (('name = "one"', 'name = "../escape"'), r"generators\[0\]\.name: .*folder name"),
        (
            ('name = "one"', 'name = "two"'),
            r"run\.toml:14: generators\[1\]\.name: generators: the name 'two' is used twice "
            r"\(also generators\[0\]\)",
        ),
        (
            ('backend = "fake"', 'backend = "fake"\n\n[[judges]]\nbackend = "fake"'),
            r"run\.toml:21: judges\[1\]\.name: judges: the name 'trigscore' is used twice",
        ),
        # Folders that differ only in case: one folder on macOS's and Windows' file systems.
        (
            ('name = "two"', 'name = "ONE"'),
            r"run\.toml:14: generators\[1\]\.name: generators: the name 'ONE' differs from "
            r"'one' \(generators\[0\]\) only in case; a model's name names its folders",
        ),
        # ... and what renaming one costs in a run directory an earlier version made with both.
        (
            ('name = "two"', 'name = "ONE"'),
            r"rename one of them \(in a run directory made before this rule, by an earlier "
            r"version, the renamed model's results stay under its old name, which the run no "
            r"longer reads, and it is generated and judged again; or start a new run directory "
            r"with --new-run\)",
        ),
        # A call's timeout past what the clients' clocks hold: every call failed (OverflowError).
        (
            (
                'backend = "fake"',
                'backend = "openai"\noptions = { model = "m", timeout_s = 1e300 }',
            ),
            r"judges\[0\]\.options\.timeout_s: Input should be less than or equal to 86400",
        ),
        (
            (
                'name = "two"\nbackend = "synthetic"\noptions = { size = 32 }',
                'name = "two"\nbackend = "openai_images"\noptions = { timeout_s = 1e10 }',
            ),
            r"generators\[1\]\.options\.timeout_s: Input should be less than or equal to 86400",
        ),
        (
            (
                'name = "two"\nbackend = "synthetic"\noptions = { size = 32 }',
                'name = "two"\nbackend = "dtm_rewrite"\noptions = { model = "m", relations = '
                '{ IQ-R_TA-C = 1 }, inner = { backend = "synthetic" }, timeout_s = 1e300 }',
            ),
            r"generators\[1\]\.options\.timeout_s: Input should be less than or equal to 86400",
        ),
        # Unknown keys of nested tables get the nearest key too (pydantic's "Extra inputs").
        (
            (
                'name = "two"\nbackend = "synthetic"\noptions = { size = 32 }',
                'name = "two"\nbackend = "dtm_rewrite"\noptions = { model = "m", relations = '
                '{ IQ-R_TA-C = 1 }, inner = { backend = "synthetic", options = { sise = 8 } } }',
            ),
            r"inner: inner synthetic options: sise: unknown key; did you mean 'size'\?",
        ),
        (
            (
                'backend = "fake"',
                'backend = "metric"\noptions = { metric = "nsfw", metric_options = '
                "{ provider = [], colour = 1 } }",
            ),
            r"judges\[0\]\.options: metric_options of 'nsfw': provider: unknown key; did you mean "
            r"'providers'\?; colour: unknown key; this table takes: providers, intra_op_threads$",
        ),
        # The report's comparison of the models sits beside their folders: no model's name.
        (
            ('name = "one"', 'name = "comparison.md"'),
            r"run\.toml:10: generators\[0\]\.name: is the name of the report's comparison",
        ),
        (('name = "one"', 'name = "COMPARISON.MD"'), r"generators\[0\]\.name: is the name"),
        # Names the run refuses (they would name a folder ".."-something): refused here.
        (('name = "demo"', 'name = "a..b"'), r"run\.toml:2: run\.name: .*without '\.\.'"),
        (('name = "one"', 'name = "one..x"'), r"run\.toml:10: generators\[0\]\.name: "),
        (('backend = "fake"', 'name = "j..1"\nbackend = "fake"'), r":19: judges\[0\]\.name: "),
        (
            ('[dataset]\npath = "prompts.json"\n', "[dataset]\n"),
            r"run\.toml:5: dataset\.path: required key is missing",
        ),
        # Was "source_size[1]: required key is missing", saying nothing of what goes there.
        (
            (
                'backend = "synthetic"\noptions = { size = 32 }',
                'backend = "diffusers"\noptions = { preset = "sd15", source_size = [512] }',
            ),
            r"run\.toml:16: generators\[1\]\.options\.source_size: source_size takes two "
            r"values, \[width, height\] .*\(got \[512\]\)$",
        ),
        (
            (
                'backend = "synthetic"\noptions = { size = 32 }',
                'backend = "diffusers"\noptions = { preset = "sd15", source_size = [8, 8, 3] }',
            ),
            r"run\.toml:16: generators\[1\]\.options\.source_size: source_size takes two ",
        ),
    ],
)
def test_bad_configs_are_refused_with_file_line_and_key(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, GOOD.replace(old, new, 1)))


DIFFUSERS_AT_LINE_16 = (
    'backend = "diffusers"\n[generators.options]\npipeline = "StableDiffusionPipeline"\n'
    'checkpoint = "c"\ndevices = ["cpu"]\n'
)
"""The second generator of GOOD as a diffusers one, its options' header at line 16; the key
under test goes at line 20."""


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("height = 60", r":20: generators\[1\]\.options\.height: height 60 is not a multiple of 8"),
        ("call = { width = 60 }", r":20: generators\[1\]\.options\.call\.width: width 60 is not"),
        (
            'offload = "sequential"',
            r":20: generators\[1\]\.options\.offload: offload 'sequential' cannot run on the "
            r"device 'cpu'",
        ),
        (
            'inputs = "edit"\nsource_size = [100, 64]',
            r":21: generators\[1\]\.options\.source_size: source_size \[100, 64\]: its width 100",
        ),
        (
            'inputs = "edit"\nsource_size = [64, 64]\nwidth = 64',
            r":21: generators\[1\]\.options\.source_size: source_size and width both set the size",
        ),
        (
            'inputs = "edit"\nheight = 64',
            r":21: generators\[1\]\.options\.height: height without width: an edit pipeline",
        ),
        (
            'inputs = "ip_adapter"',
            r":20: generators\[1\]\.options\.inputs: inputs 'ip_adapter' need the IP-Adapter",
        ),
    ],
)
def test_a_check_of_several_diffusers_options_names_the_key_at_fault(
    tmp_path: Path, keys: str, expected: str
) -> None:
    # These checks of the whole options table were reported at its header, as
    # "generators[1].options", whichever key was at fault.
    text = GOOD.replace(
        'backend = "synthetic"\noptions = { size = 32 }\n', DIFFUSERS_AT_LINE_16 + keys + "\n"
    )
    with pytest.raises(ConfigError, match=r"run\.toml" + expected) as refused:
        load_config(write(tmp_path, text))
    assert str(refused.value).count("\n") == 1, "one problem"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (('task = "sub"', 'task = "sub"\nseed = true'), r"run\.seed: .*valid integer \(got true\)"),
        (('task = "sub"', 'task = "sub"\nseed = 4.0'), r"run\.seed: .*valid integer \(got 4\.0\)"),
        (('name = "two"\n', 'name = "two"\nworkers = "2"\n'), r"workers: .*integer \(got \"2\"\)"),
        (('name = "two"\n', 'name = "two"\nworkers = 2.0\n'), r"workers: .*valid integer"),
        (('backend = "fake"', 'backend = "fake"\nconcurrency = true'), r"concurrency: .*integer"),
        (('backend = "fake"', 'backend = "fake"\nconfidence = "yes"'), r"confidence: .*boolean"),
        (('backend = "fake"', 'backend = "fake"\nconfidence = 1'), r"confidence: .*boolean"),
        (("[dataset]\n", "[relation]\nsynergy = true\n\n[dataset]\n"), r"synergy: .*number"),
        (("[dataset]\n", "[relation]\nsynergy = '0.9'\n\n[dataset]\n"), r"synergy: .*number"),
        (("[dataset]\n", "[dataset]\nlimit = '5'\n"), r"dataset\.limit: .*integer"),
        (("[dataset]\n", "[engine]\nmax_attempts = true\n\n[dataset]\n"), r"max_attempts: "),
        # Backends' options, nested ones included: a wrapper's inner generator, a metric's.
        (("options = { size = 32 }", "options = { size = true }"), r"options\.size: .*integer"),
        (
            ('backend = "fake"', 'backend = "fake"\noptions = { latency_s = "1" }'),
            r"options\.latency_s: .*number",
        ),
        (
            (
                'name = "two"\nbackend = "synthetic"\noptions = { size = 32 }',
                'name = "two"\nbackend = "dtm_rewrite"\noptions = { model = "m", relations = '
                '{ IQ-R_TA-C = 1 }, inner = { backend = "synthetic", options = { size = "8" } } }',
            ),
            r"generators\[1\]\.options\.inner: .*size: Input should be a valid integer",
        ),
        (
            (
                'backend = "fake"',
                'backend = "metric"\noptions = { metric = "nsfw", metric_options = '
                '{ intra_op_threads = "2" } }',
            ),
            r"judges\[0\]\.options: .*intra_op_threads: Input should be a valid integer",
        ),
        # A TOML date is no value of any key, not even of a table passed to a library.
        (
            ("[dataset]\n", "[dataset]\nlimit = 2024-01-01\n"),
            r"run\.toml:6: dataset\.limit: a date",
        ),
        (
            (
                'backend = "synthetic"\noptions = { size = 32 }',
                'backend = "openai_images"\noptions = { extra_body = { when = 12:00:00 } }',
            ),
            r"generators\[1\]\.options\.extra_body\.when: a date or time",
        ),
    ],
)
def test_values_are_not_converted_to_the_type_a_key_takes(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    # README: wrong types are refused. They were converted: true became 1, "2" and 2.0 the
    # integer 2, "yes" True.
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, GOOD.replace(old, new, 1)))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            'backend = "openai_images"\noptions = { api_key_env = "", base_url = "http://x/v1", '
            "extra_body = { x = nan } }",
            r"run\.toml:16: generators\[1\]\.options\.extra_body\.x: not a finite number "
            r"\(got nan\)",
        ),
        (
            'backend = "diffusers"\n[generators.options]\npipeline = "P"\ncheckpoint = "c"\n'
            "call = { joint_attention_kwargs = { scale = inf } }",
            r"run\.toml:19: generators\[1\]\.options\.call\.joint_attention_kwargs\.scale: "
            r"not a finite number \(got inf\)",
        ),
        (
            'backend = "diffusers"\noptions = { pipeline = "P", checkpoint = "c", '
            "load = { sizes = [1, -inf] } }",
            r"generators\[1\]\.options\.load\.sizes\[1\]: not a finite number \(got -inf\)",
        ),
        (  # a wrapper's inner generator's tables are passed through as well
            'backend = "dtm_rewrite"\noptions = { model = "m", relations = { IQ-R_TA-C = 1 }, '
            'inner = { backend = "diffusers", options = { pipeline = "P", checkpoint = "c", '
            "call = { scale = nan } } } }",
            r"generators\[1\]\.options\.inner\.options\.call\.scale: not a finite number",
        ),
    ],
)
def test_nan_and_infinity_in_a_passed_through_table_are_config_errors(
    tmp_path: Path, entry: str, expected: str
) -> None:
    # Nothing typed them, so they reached the manifest: exit 4 with "the fingerprint of
    # generator 'g' holds nan, which JSON cannot", naming no key and no line.
    text = GOOD.replace('backend = "synthetic"\noptions = { size = 32 }', entry)
    with pytest.raises(ConfigError, match=expected + r".*JSON, cannot hold it; give a finite "):
        load_config(write(tmp_path, text))


def test_values_of_the_types_toml_writes_are_taken(tmp_path: Path) -> None:
    # An integer where a decimal number goes, a string where a path goes, an array where a
    # tuple goes: no conversion needed, all taken.
    text = GOOD.replace(
        "options = { size = 32 }", "options = { size = 32, latency_s = 1 }"
    ).replace(
        '[[judges]]\nbackend = "fake"', '[[judges]]\nbackend = "fake"\nadaptive = { min = 2 }'
    )
    text += """
[[judges]]
name = "vlm"
backend = "transformers"
options = { model_path = "vlm", template = "t.toml" }

[relation]
synergy = 1
dominance_ratio = 1

[engine]
backoff_max = 60
"""
    text = text.replace(
        '[[generators]]\nname = "one"\nbackend = "synthetic"',
        '[[generators]]\nname = "one"\nbackend = "diffusers"\n'
        'options = { pipeline = "P", checkpoint = "c", source_size = [64, 64] }',
    )
    config = load_config(write(tmp_path, text))
    assert config.relation.synergy == 1.0 and isinstance(config.relation.synergy, float)
    assert config.engine.backoff_max == 60.0 and config.judges[0].adaptive.min == 2
    assert config.generators[1].options["latency_s"] == 1
    assert config.judges[1].options["model_path"] == str((tmp_path / "vlm").resolve())


def test_a_password_in_a_url_is_refused_and_never_quoted(tmp_path: Path) -> None:
    # The config is saved with the run: the password would be in manifest.json.
    options = 'options = { model = "m", base_url = "http://user:pw-7f3c9a@host/v1" }'
    path = write(tmp_path, GOOD.replace('backend = "fake"', f'backend = "openai"\n{options}'))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "judges[0].options.base_url: holds credentials (user:password@): remove them, " in str(
        caught.value
    )
    assert "api_key_env names" in str(caught.value) and "pw-7f3c9a" not in str(caught.value)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("[run]\n", "[run]\nextra1 = 1\n").replace(
        "[dataset]\n", "[dataset]\nextra2 = 2\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert "2 problems" in message and "extra1" in message and "extra2" in message


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('name = "demo"', 'name = "{name}"'),
        ('name = "one"', 'name = "{name}"'),
        ('backend = "fake"', 'name = "{name}"\nbackend = "fake"'),
    ],
)
def test_a_name_too_long_is_refused_naming_the_length_limit(
    tmp_path: Path, old: str, new: str
) -> None:
    # It was refused with the rule of its characters, which the name meets.
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD.replace(old, new.format(name="n" * 129), 1)))
    message = str(caught.value)
    assert "name: must be at most 128 characters long, not 129 (it becomes a folder" in message
    assert "letters, digits" not in message
    load_config(write(tmp_path, GOOD.replace(old, new.format(name="n" * 128), 1)))


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        (  # the config's own tables, then a backend's options
            [('task = "sub"', 'task = "sub"\nseed = 2.0'), ("size = 32", "size = 32.0")],
            [
                r"run\.toml:4: run\.seed: .*integer \(got 2\.0\)",
                r":17: generators\[1\]\.options\.size",
            ],
        ),
        (  # a value no key takes, an unknown key holding it, and the rest (strictly: 2.0)
            [('task = "sub"', 'task = "sub"\nseed = 2.0\nwhen = 1979-05-27')],
            [
                r":5: run\.when: a date or time",
                r":4: run\.seed: .*integer \(got 2\.0\)",
                r":5: run\.when: unknown key",
            ],
        ),
        (
            [
                ('backend = "fake"', 'backend = "openai"\nadaptive = { enabeld = true }'),
                (
                    "[[judges]]\n",
                    "[[judges]]\noptions = { model = 'm', serve = { comand = [] } }\n",
                ),
            ],
            [
                r"judges\[0\]\.adaptive\.enabeld: unknown key",
                r"judges\[0\]\.options\.serve\.command: required key is missing",
                r"judges\[0\]\.options\.serve\.comand: unknown key; did you mean 'command'",
            ],
        ),
        (  # a problem of the config's own model does not hide its backend's bad options
            [('name = "two"', 'name = "two/"'), ("size = 32", "size = true")],
            [r"generators\[1\]\.name: must start", r"generators\[1\]\.options\.size: "],
        ),
        (  # every path problem, and those beside the others (each was told only alone)
            [
                ('task = "sub"', 'task = "sub"\noutput_dir = "$SCRATCH/runs"'),
                ('path = "prompts.json"', 'path = "${DATA}/prompts.json"'),
            ],
            [r":4: run\.output_dir: .*'\$SCRATCH'", r":7: dataset\.path: .*'\$\{DATA\}'"],
        ),
        (
            [
                ('task = "sub"', 'task = "sub"\noutput_dir = "$SCRATCH/runs"\nseed = 2.0'),
                ("size = 32", "size = true"),
                ('path = "prompts.json"', 'path = "~nobody-x/prompts.json"'),
            ],
            [
                r":5: run\.seed: .*integer \(got 2\.0\)",
                r":18: generators\[1\]\.options\.size: ",
                r":4: run\.output_dir: .*'\$SCRATCH'",
                r":8: dataset\.path: .*no home folder is known for ~nobody-x",
            ],
        ),
        # A refused value is told once: no "valid integer (got "2024-01-01")" beside it.
        ([("[dataset]\n", "[dataset]\nlimit = 2024-01-01\n")], [r":6: dataset\.limit: a date"]),
        (
            [('backend = "fake"', 'backend = "fake"\noptions = { "a\\u0000" = 1 }')],
            [r"judges\[0\]\.options: the key 'a\\x00' holds a NUL"],
        ),
    ],
)
def test_every_kind_of_problem_is_listed_at_once(
    tmp_path: Path, edits: list[tuple[str, str]], expected: list[str]
) -> None:
    # README: a config error "lists every problem at once". Values no key takes, the
    # config's own tables and the backends' options were checked in turn, each only once
    # the one before had passed: a fix showed the next problem, and with a date in the file
    # the rest was read loosely (seed = 2.0 passed as 2).
    text = GOOD
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    head, *problems = str(caught.value).splitlines()
    count = len(expected)
    assert head.endswith(f"invalid config ({count} problem{'s' if count > 1 else ''})")
    assert len(problems) == count
    for pattern, problem in zip(expected, problems, strict=True):
        assert re.search(pattern, problem), (pattern, problem)


def test_a_backends_own_error_comes_after_the_configs_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend's options are checked now also when the config's own tables have problems:
    # an error of the backend's own (a missing extra, exit 4) must not hide those (exit 2).
    class NeedsExtra(SyntheticGenerator):
        class Options(BaseModel):
            @model_validator(mode="before")
            @classmethod
            def _extra(cls, data: object) -> object:
                raise MissingExtraError("some-library", "some-extra")

    monkeypatch.setitem(registry._REGISTERED["generators"], "needs_extra", NeedsExtra)
    text = GOOD.replace(
        'name = "one"\nbackend = "synthetic"', 'name = "one"\nbackend = "needs_extra"'
    )
    with pytest.raises(MissingExtraError, match="pip install 'trig-stream\\[some-extra\\]'"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"\(1 problem\)\n.*run\.toml:4: run\.seed: "):
        load_config(write(tmp_path, text.replace('task = "sub"', 'task = "sub"\nseed = "1"')))


def test_a_config_saved_with_a_byte_order_mark_and_crlf_line_ends_loads(tmp_path: Path) -> None:
    # As some Windows editors save it; its problems keep their line numbers.
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode())
    assert load_config(path).run.name == "demo"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.replace("[run]\n", "[run]\nturbo = 1\n").encode())
    with pytest.raises(ConfigError, match=r"run\.toml:2: run\.turbo"):
        load_config(path)
    # A byte that is no UTF-8 is counted from the file's start: it was 3 too low, the mark's.
    data = b"\xef\xbb\xbf" + GOOD.replace("demo", "d\xe9mo").encode("latin-1")
    path.write_bytes(data)
    at = data.index(b"\xe9")
    with pytest.raises(ConfigError, match=rf"run\.toml: not a TOML config: byte {at} is not UTF-8"):
        load_config(path)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[run\nname="))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_locate_key_understands_arrays_of_tables_and_dotted_keys() -> None:
    text = "[a]\nx = 1\n[[g]]\nn = 1\n[[g]]\nn = 2\n[g.options]\nk = 3\nb.c = 4\n"
    assert locate_key(text, ("a", "x")) == 2
    assert locate_key(text, ("g", 1, "n")) == 6
    assert locate_key(text, ("g", 1, "options", "k")) == 8
    assert locate_key(text, ("g", 1, "options", "b", "c")) == 9
    assert locate_key(text, ("g", 0, "missing")) == 3
    assert locate_key(text, ("nowhere",)) is None


def test_locate_key_reads_quoted_keys_as_toml_does() -> None:
    text = (
        '[run]\nname = "n"\n"t\\u0061ssk" = 1\n"x.y" = 2\n\'lit.\\x\' = 3\n"a\\nb" = 4\n'
        'plain . "q.r" = 5\n[ "sp ace" . inner ]\nk = 6\n'
    )
    assert locate_key(text, ("run", "tassk")) == 3
    assert locate_key(text, ("run", "x.y")) == 4
    assert locate_key(text, ("run", "lit.\\x")) == 5
    assert locate_key(text, ("run", "a\nb")) == 6
    assert locate_key(text, ("run", "plain")) == 7  # a table only a dotted key opens
    assert locate_key(text, ("run", "plain", "q.r")) == 7
    assert locate_key(text, ("sp ace", "inner", "k")) == 9
    assert locate_key(text, ("run", "x")) == 1  # "x.y" is one key, no table x


def test_a_refused_dict_key_is_named_without_pydantics_marker() -> None:
    # pydantic ends the location of a refused dict key with "[key]": it was shown as a key,
    # a.z."[key]", and the key's line was not found.
    class Table(BaseModel):
        a: dict[Literal["x", "y"], int] = {}

    with pytest.raises(ValidationError) as raised:
        Table.model_validate({"a": {"z": 1}})
    [error] = raised.value.errors()
    assert error["loc"] == ("a", "z", "[key]")
    assert dotted_key(error["loc"]) == "a.z"
    assert nested_problems(raised.value, Table).startswith("a.z: Input should be 'x' or 'y'")
    assert locate_key("[a]\nx = 1\nz = 1\n", error["loc"]) == 3


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ('"a[0]"', 'run."a[0]"'),  # its bracket read as a validator's step: the key was dropped
        ('"\\u001b[31mred"', 'run."\\u001b[31mred"'),
        ('"täsk"', 'run."täsk"'),  # not ASCII: found at the [run] line
        ('"t\\u0061ssk"', "run.tassk"),  # an escape: found at the [run] line
        ('"\\u001bx"', 'run."\\u001bx"'),
        ('"x.y"', 'run."x.y"'),  # shown as run.x.y, which reads as a dotted key
        ('"a\\nb"', 'run."a\\nb"'),  # a raw newline split the message
        ('"a\\tb"', 'run."a\\tb"'),
    ],
    ids=["bracket", "escape-sequence", "non-ascii", "escaped", "control", "dot", "newline", "tab"],
)
def test_an_unknown_key_is_named_as_toml_writes_it_at_its_line(
    tmp_path: Path, key: str, shown: str
) -> None:
    path = write(tmp_path, GOOD.replace('task = "sub"\n', f'task = "sub"\n{key} = 1\n'))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    [problem] = str(raised.value).splitlines()[1:]
    assert problem.startswith(f"  {path}:4: {shown}: unknown key; "), problem


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parent.parent / "config"
    configs = sorted(root.glob("*.toml"))
    assert configs
    for path in configs:
        load_config(path)


def test_commands_in_shipped_configs_name_paths_from_the_repository_root() -> None:
    # Every instruction runs from the repository root, the configs' own paths being relative
    # to config/: `trig-stream watch ../runs/t2i-sweep` named a folder beside the repository.
    root = Path(__file__).resolve().parent.parent
    commands = 0
    for path in sorted((root / "config").glob("*.toml")):
        comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
        for words in re.findall(r"trig-stream [\w-]+((?: [^\s`,;()]+)*)", "\n".join(comments)):
            commands += 1
            for word in words.split():
                if "/" in word and not word.startswith("-"):
                    named = (root / word).resolve()
                    assert named.is_relative_to(root), f"{path.name}: {word}"
    assert commands >= 5


def test_path_options_of_backends_are_relative_to_the_config(tmp_path: Path) -> None:
    text = GOOD.replace(
        'name = "one"\nbackend = "synthetic"',
        'name = "one"\nbackend = "image_folder"\noptions = { path = "images/one" }',
    )
    config = load_config(write(tmp_path, text))
    assert config.generators[0].options["path"] == str((tmp_path / "images" / "one").resolve())
    assert config.generators[1].options == {"size": 32}


def test_a_path_starting_with_a_tilde_starts_in_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was a folder literally named "~" beside the config (and `rm -rf ~` is one step away).
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    text = (
        GOOD.replace('task = "sub"', 'task = "sub"\noutput_dir = "~/runs"')
        .replace('path = "prompts.json"', 'path = "~/prompts.json"\nimage_root = "~"')
        .replace(
            'name = "one"\nbackend = "synthetic"',
            'name = "one"\nbackend = "image_folder"\noptions = { path = "~/images" }',
        )
        .replace('name = "two"\nbackend = "synthetic"\noptions = { size = 32 }', DIFFUSERS_TWO)
    )
    config = load_config(write(tmp_path / "project", text))
    assert config.run_dir == home / "runs" / "demo"
    assert (config.dataset.path, config.dataset.image_root) == (home / "prompts.json", home)
    assert config.generators[0].options["path"] == str(home / "images")
    assert config.generators[1].options["checkpoint"] == str(home / "ckpt")
    assert not (tmp_path / "project" / "~").exists()


DIFFUSERS_TWO = """\
name = "two"
backend = "diffusers"
options = { pipeline = "P", checkpoint = "~/ckpt" }"""


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (('path = "prompts.json"', 'path = ""'), r"run\.toml:6: dataset\.path: the path is empty"),
        (
            ('task = "sub"', 'task = "sub"\noutput_dir = ""'),
            r":4: run\.output_dir: the path is empty",
        ),
        (
            ('path = "prompts.json"', 'path = "prompts.json"\nimage_root = ""'),
            r":7: dataset\.image_root: the path is empty",
        ),
        (
            (
                'name = "one"\nbackend = "synthetic"',
                'name = "one"\nbackend = "image_folder"\noptions = { path = "" }',
            ),
            r"generators\[0\]\.options\.path: the path is empty",
        ),
        (
            (
                'name = "two"\nbackend = "synthetic"\noptions = { size = 32 }',
                'name = "two"\nbackend = "diffusers"\n'
                'options = { pipeline = "P", checkpoint = "" }',
            ),
            r"generators\[1\]\.options\.checkpoint: the path is empty",
        ),
        (
            ('backend = "fake"', 'backend = "transformers"\noptions = { model_path = "" }'),
            r"judges\[0\]\.options\.model_path: the path is empty",
        ),
    ],
)
def test_an_empty_path_is_refused_naming_its_key(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    # Path("") is ".": an empty model_path passed validate and the run wrote its run dir
    # before failing to load a model from the config's own folder; an empty template was
    # "cannot read judge template: Is a directory", naming no key.
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, GOOD.replace(*edit)))


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (
            ('task = "sub"', 'task = "sub"\noutput_dir = "~no-such-user-x9/runs"'),
            r":4: run\.output_dir",
        ),
        (
            (
                'name = "one"\nbackend = "synthetic"',
                'name = "one"\nbackend = "image_folder"\n'
                'options = { path = "~no-such-user-x9/images" }',
            ),
            r":12: generators\[0\]\.options\.path",
        ),
    ],
)
def test_the_home_folder_of_an_unknown_user_is_refused(
    tmp_path: Path, edit: tuple[str, str], where: str
) -> None:
    # The message named the key but no line: the paths are resolved after validation.
    text = GOOD.replace(*edit)
    with pytest.raises(ConfigError, match=r"run\.toml" + where + r": .*no home folder is known"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("edit", "where", "part"),
    [
        (
            ('task = "sub"', 'task = "sub"\noutput_dir = "$HOME/runs"'),
            r":4: run\.output_dir",
            "$HOME",
        ),
        (
            ('path = "prompts.json"', 'path = "data/${SPLIT}.json"'),
            r":6: dataset\.path",
            "${SPLIT}.json",
        ),
        (
            ('pairs = ["TA-C_IQ-R"]', 'pairs = ["TA-C_IQ-R"]\nimage_root = "/data/$USER/img"'),
            r":8: dataset\.image_root",
            "$USER",
        ),
        (
            (
                'name = "one"\nbackend = "synthetic"',
                'name = "one"\nbackend = "image_folder"\noptions = { path = "x/$DATA" }',
            ),
            r":12: generators\[0\]\.options\.path",
            "$DATA",
        ),
        (
            (
                'name = "one"\nbackend = "synthetic"',
                'name = "one"\nbackend = "image_folder"\noptions = { path = "/abs/$DATA" }',
            ),
            r":12: generators\[0\]\.options\.path",
            "$DATA",
        ),
        (
            (
                '[[judges]]\nbackend = "fake"',
                '[[judges]]\nbackend = "transformers"\n'
                'options = { model_path = "vlm", template = "$TPL/t.toml" }',
            ),
            r":20: judges\[0\]\.options\.template",
            "$TPL",
        ),
    ],
)
def test_a_path_with_an_environment_variable_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: tuple[str, str], where: str, part: str
) -> None:
    # "$HOME/runs" made a folder literally named "$HOME" beside the config: variables are
    # not expanded, and the path is refused at its key and line as a "~user" one is.
    for name in ("HOME", "USER", "DATA", "TPL"):  # set, as a shell would expand them
        monkeypatch.setenv(name, "/somewhere")
    monkeypatch.delenv("SPLIT", raising=False)  # ${...} is refused, set or not
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD.replace(*edit, 1)))
    message = str(caught.value)
    assert re.search(r"run\.toml" + where + ": ", message), message
    assert f"{part!r} looks like an environment variable" in message
    assert "no variable is expanded): write the path out in full" in message
    assert not (tmp_path / "$HOME").exists()


def test_a_dollar_inside_a_name_is_taken_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("b", raising=False)
    text = GOOD.replace('task = "sub"', 'task = "sub"\noutput_dir = "out/a$b"')
    config = load_config(write(tmp_path, text))
    assert config.run.output_dir == tmp_path / "out" / "a$b"


@pytest.mark.parametrize("output_dir", ["$SCRATCH/runs", "out/$SCRATCH", "{tmp}/$SCRATCH/runs"])
def test_a_part_starting_with_a_variable_is_refused_even_when_it_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output_dir: str
) -> None:
    # Unset (cron, CI), "$SCRATCH/runs" became a folder literally named "$SCRATCH", while the
    # same config was refused in a shell that set it.
    monkeypatch.delenv("SCRATCH", raising=False)
    written = output_dir.format(tmp=tmp_path)
    text = GOOD.replace('task = "sub"', f'task = "sub"\noutput_dir = "{written}"')
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    message = str(caught.value)
    assert "run.toml:4: run.output_dir: " in message
    assert "'$SCRATCH' looks like an environment variable ($SCRATCH)" in message
    assert "write the path out in full" in message
    assert not (tmp_path / "$SCRATCH").exists()


@pytest.mark.parametrize("output_dir", ["{tmp}/x/$RECYCLE.BIN/y", "x/$RECYCLE.BIN", "$1/x"])
@pytest.mark.parametrize("variable_set", [False, True])
def test_a_folder_whose_name_starts_with_a_dollar_is_taken_once_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output_dir: str, variable_set: bool
) -> None:
    # "$RECYCLE.BIN" (a Windows folder) is a real name: taken as written once it exists,
    # whatever the environment holds ("$1" names no variable a config could mean).
    if variable_set:
        monkeypatch.setenv("RECYCLE", "/bin")
    else:
        monkeypatch.delenv("RECYCLE", raising=False)
    written = output_dir.format(tmp=tmp_path)
    text = GOOD.replace('task = "sub"', f'task = "sub"\noutput_dir = "{written}"')
    if "$RECYCLE" in written:
        with pytest.raises(ConfigError, match=r"looks like an environment variable \(\$RECYCLE\)"):
            load_config(write(tmp_path, text))
        (tmp_path / "x" / "$RECYCLE.BIN").mkdir(parents=True)
    config = load_config(write(tmp_path, text))
    assert config.run.output_dir == tmp_path / written


def test_a_braced_variable_is_refused_unless_its_folder_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPLIT", raising=False)
    text = GOOD.replace('task = "sub"', 'task = "sub"\noutput_dir = "out/${SPLIT}"')
    with pytest.raises(ConfigError, match=r"'\$\{SPLIT\}' looks like an environment variable"):
        load_config(write(tmp_path, text))
    (tmp_path / "out" / "${SPLIT}").mkdir(parents=True)
    assert load_config(write(tmp_path, text)).run.output_dir == tmp_path / "out" / "${SPLIT}"


def test_a_variable_inside_a_name_is_refused_when_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "ada")
    text = GOOD.replace('task = "sub"', 'task = "sub"\noutput_dir = "out/runs-$USER"')
    with pytest.raises(ConfigError, match=r"'runs-\$USER' looks like an environment variable"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (('path = "prompts.json"', 'path = "a\\u0000b.json"'), r"run\.toml:6: dataset\.path: "),
        (('task = "sub"', 'task = "sub"\noutput_dir = "/tmp/x\\u0000y"'), r":4: run\.output_dir"),
        (
            (
                'name = "one"\nbackend = "synthetic"',
                'name = "one"\nbackend = "image_folder"\noptions = { path = "a\\u0000b" }',
            ),
            r"run\.toml:12: generators\[0\]\.options\.path: ",
        ),
        (
            ('backend = "fake"', 'backend = "fake"\noptions = { "a\\u0000" = 1 }'),
            r"judges\[0\]\.options: the key 'a\\x00' ",
        ),
    ],
)
def test_text_with_a_nul_character_is_refused(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    # A traceback from resolving the path (or, for an absolute one, from the run's mkdir).
    old, new = edit
    with pytest.raises(ConfigError, match=expected + r".*holds a NUL character \(\\u0000\)"):
        load_config(write(tmp_path, GOOD.replace(old, new, 1)))


def test_tables_passed_through_to_a_library_keep_their_values(tmp_path: Path) -> None:
    # A key named like one of ours inside a pipeline's call or loading arguments, or an
    # images API's extra body, is the library's: it must reach it as written. A wrapper's
    # inner generator's options are ours, and resolved.
    generators = """
[[generators]]
name = "rewritten"
backend = "dtm_rewrite"
[generators.options]
model = "llm"
relations = { IQ-R_TA-C = 1 }
inner = { backend = "image_folder", options = { path = "images" } }

[[generators]]
name = "flux"
backend = "diffusers"
[generators.options]
pipeline = "FluxPipeline"
checkpoint = "./tiny"
call = { path = "c" }
load = { path = "l" }

[[generators]]
name = "api"
backend = "openai_images"
options = { extra_body = { path = "e" } }
"""
    text = GOOD.replace(
        '[[generators]]\nname = "one"\nbackend = "synthetic"\n', generators.lstrip("\n")
    )
    config = load_config(write(tmp_path, text))
    rewritten, flux, api = (g.options for g in config.generators[:3])
    assert rewritten["inner"]["options"]["path"] == str((tmp_path / "images").resolve())
    assert flux["checkpoint"] == str((tmp_path / "tiny").resolve())
    assert flux["call"] == {"path": "c"} and flux["load"] == {"path": "l"}
    assert api["extra_body"] == {"path": "e"}


@pytest.mark.parametrize("key", ["run.output_dir", "dataset.path", "generators[0].options.path"])
def test_a_path_that_is_not_utf8_is_refused_naming_its_key(tmp_path: Path, key: str) -> None:
    # A folder named in Latin-1: the run took its directory, then crashed writing a manifest
    # that cannot hold the path (PydanticSerializationError), and validate said ok.
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    folder.mkdir()
    where = {
        "run.output_dir": ('output_dir = "runs"', f'output_dir = "{tmp_path}/runs"'),
        "dataset.path": ('path = "prompts.json"', f'path = "{tmp_path}/prompts.json"'),
    }
    text = (
        '[run]\nname = "r"\noutput_dir = "runs"\n'
        '[dataset]\npath = "prompts.json"\n'
        '[[generators]]\nname = "folder"\nbackend = "image_folder"\n'
        f'options = {{ path = "{tmp_path}/images" }}\n'
        '[[judges]]\nbackend = "fake"\n'
    )
    if key == "generators[0].options.path":
        text = text.replace(f'"{tmp_path}/images"', '"images"')
    for other, (relative, absolute) in where.items():
        if other != key:
            text = text.replace(relative, absolute)
    (folder / "run.toml").write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(folder / "run.toml")
    message = str(refused.value)
    assert f"{key}: " in message and "caf\\xe9" in message and "not UTF-8" in message


@pytest.mark.parametrize(
    ("depth", "where", "line"),
    [
        (5000, "run", 4),  # past the TOML reader's recursion: a RecursionError traceback
        (300, "run", 4),  # past the validator's JSON reader: "Invalid JSON: recursion limit"
        (300, "judges", 20),  # inside a backend's options (fail_ids)
    ],
    ids=["5000", "300", "options"],
)
def test_values_nested_too_deep_are_refused_in_one_line(
    tmp_path: Path, depth: int, where: str, line: int
) -> None:
    value = "[" * depth + "]" * depth
    if where == "run":
        text = GOOD.replace('task = "sub"\n', f'task = "sub"\nx = {value}\n')
        key = "run.x"
    else:
        text = GOOD + f"options = {{ fail_ids = {value} }}\n"
        key = "judges[0].options.fail_ids"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    if depth > 1000:  # the TOML reader itself gives up: no key is known
        assert message == (
            f"{path}: not a usable config: arrays or tables nested too deep to read (over 64 "
            "levels); a config needs a few"
        )
    else:
        assert message.splitlines()[1:] == [
            f"  {path}:{line}: {key}: holds arrays or tables nested more than 64 levels deep, "
            "too deep to read; a config needs a few"
        ]


SERVED_MODEL_ENTRIES = {
    # backend: (the entry naming MODEL with what the run needs beside it, its key)
    "openai": (
        '[[generators]]\nname = "s"\nbackend = "synthetic"\n[[judges]]\nbackend = "openai"\n'
        'options = { model = MODEL, base_url = "http://127.0.0.1:9/v1" }\n',
        "judges[0]",
    ),
    "openai_images": (
        '[[generators]]\nname = "g"\nbackend = "openai_images"\noptions = { model = MODEL }\n'
        '[[judges]]\nbackend = "fake"\n',
        "generators[0]",
    ),
    "dtm_rewrite": (
        '[[generators]]\nname = "g"\nbackend = "dtm_rewrite"\noptions = { model = MODEL, '
        'inner = { backend = "synthetic" }, relations = { IQ-R_TA-C = 1 } }\n'
        '[[judges]]\nbackend = "fake"\n',
        "generators[0]",
    ),
}


@pytest.mark.parametrize("backend", list(SERVED_MODEL_ENTRIES))
@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ('""', "is empty or blank"),
        ('" "', "is empty or blank"),
        ('"m\\nx"', "holds a control character"),
        ('"m\\tx"', "holds a control character"),
        ('" m"', "starts or ends with a space"),
    ],
)
def test_validate_refuses_a_served_model_name_no_server_serves_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str, model: str, problem: str
) -> None:
    # Each validated (exit 0); the run then sent it in every request, each answered 404,
    # and its manifest recorded model "".
    from tests.conftest import run_and_dataset_toml
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_CONFIG

    entries, key = SERVED_MODEL_ENTRIES[backend]
    path = tmp_path / "run.toml"
    path.write_text(run_and_dataset_toml(tmp_path) + entries.replace("MODEL", model))
    assert main(["validate", str(path)]) == EXIT_CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert f"{key}.options.model: {problem}" in err


def test_the_readme_engine_table_gives_the_bounds_of_its_integers() -> None:
    # max_attempts is refused above 100, yet the README's [engine] table gave no bound.
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("### `[engine]`", 1)[1].split("\n#", 1)[0]
    rows = {line.split("`")[1]: line for line in table.splitlines() if line.startswith("| `")}
    bounded = 0
    for name, field in EngineSection.model_fields.items():
        ge = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
        le = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
        if field.annotation is int and le is not None:
            bounded += 1
            assert rows[name].endswith(f"; {ge} to {le} |"), rows[name]
    assert bounded  # max_attempts at least
