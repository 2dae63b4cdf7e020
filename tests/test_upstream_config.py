"""``import-config``: upstream TRIG YAML configs become trig-stream TOML configs that load."""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from tests.conftest import home_and_work_folders
from trig_stream import cli
from trig_stream.config import MAX_CONFIG_BYTES, load_config
from trig_stream.config_problems import unusable_entries
from trig_stream.errors import ConfigError
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_RUN_DIR
from trig_stream.upstream_config import add_import_config_command, import_config
from trig_stream.upstream_config.toml_writer import comment, toml_key, toml_value

# Upstream's evaluation layout: judge definitions as YAML anchors, merged into each
# dimension's metrics list; one image folder (and result file) per model.
EVALUATION = """\
name: "judge-folders"
task: "p2p"
prompt_path: "prompts/p2p.json"
image_path: "prompts/sources"

evaluation:
    image_dirs: ["out/p2p/editor-a", "out/p2p/editor-b/"]
    result_dir: "results"
    result_files: ["results/a.json", "results/b.json"]

LocalJudge: &LocalJudge
  name: trig_api
  model_name: Qwen/Qwen2.5-VL-7B-Instruct
  endpoint: "http://localhost:9100/v1/"
  top_logprobs: 5

dimensions:
  IQ-R:
    metrics:
      - <<: *LocalJudge
  IQ-O:
    metrics:
      - <<: *LocalJudge
  IQ-A:
    metrics:
      - <<: *LocalJudge
  TA-C:
    metrics:
      - <<: *LocalJudge
  TA-R:
    metrics:
      - <<: *LocalJudge
  TA-S:
    metrics:
      - <<: *LocalJudge
  D-K:
    metrics:
      - <<: *LocalJudge
  D-A:
    metrics:
      - <<: *LocalJudge
  R-T:
    metrics:
      - <<: *LocalJudge
  R-B:
    metrics:
      - <<: *LocalJudge

relation:
  metric: "pearson_corr"
  thresholds:
    synergy: 0.7
    bottleneck: 0.45
  insight_thresholds:
    synergy_density: 0.35
    bottleneck_density: 0.3
    dominance_ratio: 0.75
    tradeoff_corr: 0.5
"""

# Upstream's generation layout: model aliases, the Hugging Face dataset, index bounds.
GENERATION = """\
name: "gen-sweep"
task: "t2i"
dataset_name: "RISys-Lab/TRIG"
start_idx: 0
end_idx: 120
generation:
  models: ["flux", "sana", "dalle3", "sd35_dtm_dim"]
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def convert_to_file(tmp_path: Path, text: str) -> tuple[Path, tuple[str, ...]]:
    """Convert like the command does, write the TOML, return it and the warnings."""
    source = write(tmp_path / "upstream" / "config", "run.yaml", text)
    out = tmp_path / "mine" / "run.toml"
    conversion = import_config(source, out=out, root=tmp_path / "upstream")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(conversion.text, encoding="utf-8")
    return out, conversion.warnings


def test_evaluation_config_maps_folders_judge_dataset_and_thresholds(tmp_path: Path) -> None:
    out, warnings = convert_to_file(tmp_path, EVALUATION)
    config = load_config(out)
    root = tmp_path / "upstream"

    assert config.run.name == "judge-folders"
    assert config.run.task == "p2p"
    assert config.run.output_dir == (root / "results").resolve()
    assert config.dataset.path == (root / "prompts" / "p2p.json").resolve()
    assert config.dataset.image_root == (root / "prompts" / "sources").resolve()
    assert config.dataset.dimensions == []  # every dimension has the judge

    assert [(g.name, g.backend) for g in config.generators] == [
        ("editor-a", "image_folder"),
        ("editor-b", "image_folder"),
    ]
    assert config.generators[1].options["path"] == str((root / "out/p2p/editor-b").resolve())

    (judge,) = config.judges
    assert (judge.name, judge.backend, judge.scorer) == ("trigscore", "openai", "trig")
    assert judge.options == {
        "base_url": "http://localhost:9100/v1",
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "top_logprobs": 5,
    }

    relation = config.relation
    assert relation.correlation == "pearson_corr"
    assert (relation.synergy, relation.bottleneck) == (0.7, 0.45)
    assert (relation.synergy_density, relation.bottleneck_density) == (0.35, 0.3)
    assert (relation.dominance_ratio, relation.tradeoff_corr) == (0.75, 0.5)

    # Keys with no counterpart are named, never dropped in silence.
    assert any(w.startswith("evaluation.result_files:") for w in warnings)
    assert any(w.startswith("LocalJudge:") for w in warnings)


def test_generation_config_maps_aliases_to_backends(tmp_path: Path) -> None:
    out, warnings = convert_to_file(tmp_path, GENERATION)
    config = load_config(out)
    generators = {g.name: g for g in config.generators}
    assert list(generators) == ["flux", "sana", "dalle3", "sd35_dtm_dim"]

    assert generators["flux"].backend == "diffusers"
    assert generators["flux"].options == {"preset": "flux", "devices": ["cuda:0"]}
    assert generators["sana"].options == {"preset": "sana", "devices": ["cuda:1"]}
    assert generators["dalle3"].backend == "openai_images"
    assert generators["dalle3"].options == {"model": "dall-e-3"}

    dtm = generators["sd35_dtm_dim"]
    assert dtm.backend == "dtm_rewrite"
    assert dtm.options["inner"] == {
        "backend": "diffusers",
        "options": {"preset": "sd35", "devices": ["cuda:2"]},
    }
    assert dtm.options["report"].endswith("sd35/report/sd35/relationship_codes.csv")
    assert any(w.startswith("generation.models[sd35_dtm_dim]:") for w in warnings)

    # The Hugging Face dataset becomes a local folder of the task's split, with how to get it.
    assert config.dataset.path == (tmp_path / "upstream" / "data" / "TRIG" / "t2i").resolve()
    assert config.dataset.limit == 120
    (download,) = [w for w in warnings if w.startswith("dataset_name:")]
    assert "data/text_to_image-*" in download

    # No dimensions section upstream: a default judge is written, and said so.
    (judge,) = config.judges
    assert judge.backend == "openai" and judge.options["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert judge.options["top_logprobs"] == 5  # upstream's trig_api default: scorer = trig
    assert any(w.startswith("dimensions:") and "check [[judges]]" in w for w in warnings)


def test_unknown_and_unsupported_keys_warn_and_head_the_toml(tmp_path: Path) -> None:
    text = """\
name: "odd"
task: "sub"
prompt_path: "s2p.json"
colour: "red"
start_idx: 10
generation:
  models: ["blipdiffusion", "ominicontrol", "flux"]
  batch: 4
evaluation:
  image_dirs: ["out/s2p/xflux"]
  cache: true
GPTJudge: &GPTJudge
  name: trig_api
  API_KEY: "sk-never-copied"
  endpoint: "https://api.openai.com/v1"
  model_name: gpt-4o
  top_logprobs: 5
  temperature: 0.5
dimensions:
  IQ-R:
    metrics:
      - <<: *GPTJudge
      - niqe
  D-M:
    metrics: [niqe]
relation:
  node_colors: {"IQ-R": "#fff"}
"""
    out, warnings = convert_to_file(tmp_path, text)
    config = load_config(out)
    assert config.run.task == "s2p"
    assert [g.name for g in config.generators] == ["blipdiffusion", "xflux"]

    expected = {
        "colour": "unknown upstream key",
        "start_idx": "cannot be skipped",
        "generation.batch": "unknown upstream key",
        "generation.models[ominicontrol]": "no diffusers preset",
        "generation.models[flux]": "a t2i model, the task is s2p",
        "evaluation.cache": "unknown upstream key",
        "dimensions.IQ-R.metrics[0].API_KEY": "not copied",
        "dimensions.IQ-R.metrics[0].temperature": "unknown trig_api parameter",
        "dimensions.IQ-R.metrics[1]": "'niqe' has no counterpart",
        "dimensions.D-M": "not one of TRIG's ten dimensions",
        "relation.node_colors": "unsupported",
    }
    for key, words in expected.items():
        hits = [w for w in warnings if w.startswith(f"{key}:")]
        assert hits, f"no warning for {key}: {warnings}"
        assert words in hits[0]

    toml_text = out.read_text()
    header = toml_text.split("\n[run]", 1)[0]
    for line in warnings:
        assert f"#   - {line}" in header
    assert "sk-never-copied" not in toml_text
    (judge,) = config.judges
    assert judge.options["api_key_env"] == "OPENAI_API_KEY"
    # Only IQ-R has the judge: the dataset keeps the samples that can be judged.
    assert config.dataset.dimensions == ["IQ-R"]


def test_judges_are_grouped_by_model_and_endpoint(tmp_path: Path) -> None:
    text = """\
name: "two-judges"
task: "t2i"
prompt_path: "t2i.json"
evaluation:
  image_dirs: "out/t2i/model"
A: &A {name: trig_api, model_name: judge-a, endpoint: "http://a:8000/v1"}
B: &B {name: trig_api, model_name: judge-b, endpoint: "http://b:8000/v1", top_logprobs: 50}
dimensions:
  IQ-R: {metrics: [*A, *B]}
  TA-C: {metrics: [*A]}
"""
    out, warnings = convert_to_file(tmp_path, text)
    config = load_config(out)
    assert [(j.name, j.options["model"]) for j in config.judges] == [
        ("trigscore-judge-a", "judge-a"),
        ("trigscore-judge-b", "judge-b"),
    ]
    assert config.judges[0].options["top_logprobs"] == 5  # upstream's default
    assert config.judges[1].options["top_logprobs"] == 20  # capped
    assert any("judge-b" in w and "also TA-C" in w for w in warnings)
    assert config.dataset.dimensions == ["IQ-R", "TA-C"]


def test_endpoints_that_differ_by_a_trailing_slash_are_one_judge(tmp_path: Path) -> None:
    # They were two judges of one server, each scoring every dimension: twice the load, and
    # two metrics in the report.
    text = """\
generation: {models: [flux]}
dimensions:
  IQ-R: {metrics: [{name: trig_api, model_name: j, endpoint: "http://h:8000/v1/"}]}
  IQ-O: {metrics: [{name: trig_api, model_name: j, endpoint: "http://h:8000/v1"}]}
"""
    out, warnings = convert_to_file(tmp_path, text)
    config = load_config(out)
    assert [(j.name, j.options["base_url"]) for j in config.judges] == [
        ("trigscore", "http://h:8000/v1")
    ]
    assert config.dataset.dimensions == ["IQ-R", "IQ-O"]
    assert not [w for w in warnings if "upstream asks it only about" in w]


def test_an_endpoint_that_is_not_a_string_is_refused_naming_its_key(tmp_path: Path) -> None:
    # It was written as the text of the list and refused as "base_url: holds spaces".
    text = (
        "generation: {models: [flux]}\n"
        "dimensions: {IQ-R: {metrics: [{name: trig_api, endpoint: [a, b]}]}}\n"
    )
    source = write(tmp_path, "up.yaml", text)
    with pytest.raises(ConfigError) as raised:
        import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    message = str(raised.value)
    assert message.startswith(
        f"{source}: dimensions.IQ-R.metrics[0].endpoint: ['a', 'b'] is not a URL"
    )
    assert "base_url" not in message


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        (
            "task: p2p\nimage_path: true\ngeneration: {models: [instructp2p]}\n",
            "image_path: left out: expected a folder, got True",
        ),
        (
            "evaluation: {result_dir: {a: 1}, image_dirs: [x]}\n",
            "evaluation.result_dir: left out: expected a folder, got {'a': 1}",
        ),
        (
            "name: [a, b]\nevaluation: {image_dirs: [x]}\n",
            "name: left out: expected a run name, got ['a', 'b']",
        ),
        (
            "dataset_name: {repo: x}\nevaluation: {image_dirs: [x]}\n",
            "dataset_name: left out: expected a dataset name, got {'repo': 'x'}",
        ),
    ],
)
def test_optional_values_of_the_wrong_type_are_left_out_with_a_warning(
    tmp_path: Path, text: str, warning: str
) -> None:
    # They were written as their text: image_root = ".../True", output_dir = ".../{'a': 1}".
    out, warnings = convert_to_file(tmp_path, text)
    config = load_config(out)
    assert warning in warnings
    assert config.dataset.image_root is None
    assert config.run.output_dir == (out.parent / "runs").resolve()
    assert config.run.name == "run"  # the upstream file's name
    assert (
        config.dataset.path == (tmp_path / "upstream" / "data" / "TRIG" / config.run.task).resolve()
    )
    assert "{" not in out.read_text().split("\n[run]", 1)[1]


def test_a_prompt_path_that_is_no_path_is_refused(tmp_path: Path) -> None:
    # It became path = ".../['a.json', 'b.json']"; left out, the run would read another dataset.
    source = write(
        tmp_path, "up.yaml", "prompt_path: [a.json, b.json]\ngeneration: {models: [flux]}\n"
    )
    with pytest.raises(ConfigError) as raised:
        import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    assert str(raised.value).startswith(
        f"{source}: prompt_path: expected a path, got ['a.json', 'b.json']: name one JSON file"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("task: t2i_ml\ngeneration: {models: [flux]}\n", r"task: 't2i_ml' has no counterpart"),
        ("task: t2i\ngeneration: {models: [janus]}\n", r"nothing to evaluate"),
        ("dimensions:\n  IQ-R: {metrics: [*Missing]}\n", r"not valid YAML"),
        ("- just\n- a list\n", r"a mapping of keys at the top level"),
        (f"end_idx: {'9' * 5000}\n", r"not valid YAML: .*Exceeds the limit \(4300 digits\)"),
    ],
)
def test_unconvertible_configs_are_refused(tmp_path: Path, text: str, message: str) -> None:
    source = write(tmp_path, "bad.yaml", text)
    # Python's own limit, whatever PYTHONINTMAXSTRDIGITS says (0 lifts it: the 5,000-digit
    # end_idx then parses, and is left out with a warning as any past 64 bits is).
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(4300)
    try:
        with pytest.raises(ConfigError, match=message):
            import_config(source, out=tmp_path / "bad.toml", root=tmp_path)
    finally:
        sys.set_int_max_str_digits(limit)


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    return path


def oversized(tmp_path: Path) -> Path:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as file:
        file.truncate(MAX_CONFIG_BYTES + 1)  # sparse: no disk is filled
    return path


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda _: Path("/dev/zero"), "it is a character device, not a file"),
        (fifo, "it is a named pipe (FIFO), not a file"),
        (oversized, "it is larger than 16 MiB"),
    ],
    ids=["device", "fifo", "too-large"],
)
def test_an_upstream_config_that_is_no_small_file_is_refused_unread(
    tmp_path: Path, make: Callable[[Path], Path], why: str
) -> None:
    # /dev/zero was read until memory ran out, a pipe with no writer waited for ever, and a
    # huge file was read whole before anything was checked.
    source = make(tmp_path)
    with pytest.raises(ConfigError) as raised:
        import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    assert str(raised.value) == f"{source}: cannot read upstream config: {why}"


def test_an_upstream_config_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "latin-1.yaml"
    source.write_bytes("task: t2i  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"byte 16 is not UTF-8 text"):
        import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    assert not (tmp_path / "out.toml").exists()


@pytest.mark.parametrize(
    "value",
    ["plain", 'quote " and back\\slash', "new\nline\ttab", "ünïcødé ✓", "del\x7fchar", ""],
)
def test_strings_survive_the_toml_writer(value: str) -> None:
    assert tomllib.loads(f"key = {toml_value(value)}")["key"] == value


CONTROLS = "".join(map(chr, range(0x20))) + "\x7f"
"""Every character TOML forbids raw in a comment (tab aside) or a string."""


@pytest.mark.parametrize("value", [f"a{CONTROLS}b", "del\x7fchar", "ctrl\x01"])
def test_keys_with_control_characters_survive_the_toml_writer(value: str) -> None:
    assert tomllib.loads(f"{toml_key(value)} = {toml_value(value)}\n") == {value: value}


@pytest.mark.parametrize("value", [f"a{CONTROLS}b", "del\x7fchar", "ctrl\x01"])
def test_comments_with_control_characters_stay_comments(value: str) -> None:
    assert tomllib.loads(f"# {comment(value)}\nkey = 1\n") == {"key": 1}
    assert "\\x01" in comment("ctrl\x01") and "\\x7f" in comment("del\x7fchar")


def test_control_characters_in_upstream_keys_and_paths_give_a_config_that_parses(
    tmp_path: Path,
) -> None:
    # The warning comments echoed them raw: "the converted config does not validate: Found
    # invalid character '\x01' (at line 6, column 10)", a line of a file never written.
    text = (
        '"foo\\x01": 1\n"bar\\x7f": 2\nprompt_path: "C:\\\\data\\\\p\\x01.json"\n'
        'generation: {models: [flux, "sana\\x1b"]}\n'
    )
    source = write(tmp_path, "up\x1b.yaml", text)
    conversion = import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    assert "foo\x01: unknown upstream key, left out" in conversion.warnings
    header = conversion.text.split("\n[run]", 1)[0]
    assert "#   - foo\\x01: unknown upstream key" in header
    assert "#   - bar\\x7f: unknown upstream key" in header
    assert "generation.models[sana\\x1b]" in header
    assert "from " + str(tmp_path / "up\\x1b.yaml") in header
    assert tomllib.loads(conversion.text)["dataset"]["path"] == "C:/data/p\x01.json"


def run_command(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_import_config_command(parser.add_subparsers())
    args = parser.parse_args(argv)
    stream = io.StringIO()
    code: int = args.handler(args, Console(file=stream, soft_wrap=True, width=200))
    return code, stream.getvalue()


def test_the_command_shows_a_warning_s_control_characters_escaped(tmp_path: Path) -> None:
    # Printed raw, an upstream key's ESC sequence reached the terminal.
    source = write(tmp_path, "up.yaml", '"foo\\x1b[2J": 1\ngeneration: {models: [flux]}\n')
    out = tmp_path / "out.toml"
    code, messages = run_command(["import-config", str(source), "-o", str(out)])
    assert code == 0
    assert "warning: foo\\x1b[2J: unknown upstream key" in messages
    assert "\x1b" not in messages


@pytest.mark.parametrize("option", ["--out=", "-o="])
def test_an_out_with_a_leading_tilde_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    # --out=~/x.toml (no shell expands ~ after "=") wrote a folder literally named "~" in the
    # current folder, as `report --out` no longer did.
    home, work = home_and_work_folders(tmp_path, monkeypatch)
    source = write(tmp_path, "upstream.yaml", GENERATION)
    assert cli.main(["import-config", str(source), f"{option}~/x.toml"]) == 0
    assert not (work / "~").exists()
    assert load_config(home / "x.toml").run.name == "gen-sweep"


def test_command_writes_the_file_warns_and_refuses_to_overwrite(tmp_path: Path) -> None:
    source = write(tmp_path, "upstream.yaml", GENERATION.replace("gen-sweep", "cmd"))
    out = tmp_path / "config" / "imported.toml"
    argv = ["import-config", str(source), "-o", str(out), "--root", str(tmp_path)]

    code, messages = run_command(argv)
    assert code == 0
    assert load_config(out).run.name == "cmd"
    assert "warning: dataset_name:" in messages
    assert "4 model(s), 1 judge(s)" in messages

    with pytest.raises(ConfigError, match="exists; pass --force"):
        run_command(argv)
    code, _ = run_command([*argv, "--force"])
    assert code == 0


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("folder", "is a folder; -o names the TOML file to write"),
        ("file/x.toml", "cannot write the config: a file stands where a folder of its path"),
    ],
)
def test_command_refuses_an_output_it_cannot_write_in_one_message(
    tmp_path: Path, out: str, message: str
) -> None:
    source = write(tmp_path, "upstream.yaml", GENERATION)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    argv = ["import-config", str(source), "-o", str(tmp_path / out), "--root", str(tmp_path)]
    with pytest.raises(ConfigError, match=message):
        run_command([*argv, "--force"])


@pytest.mark.parametrize(
    ("out", "full_disk", "code", "message"),
    [
        ("file/x.toml", False, EXIT_RUN_DIR, "cannot write the config: a file stands where"),
        ("x.toml", True, EXIT_RUN_DIR, "cannot write the config: No space left on device"),
        ("folder", False, EXIT_CONFIG, "is a folder; -o names the TOML file to write"),
    ],
    ids=["file-in-path", "full-disk", "folder-named"],
)
def test_an_output_that_cannot_be_written_exits_3(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    out: str,
    full_disk: bool,
    code: int,
    message: str,
) -> None:
    # It exited 2, as for a bad input, where report, analyze, compare and make-tiny-models
    # exit 3 for an output they cannot write. Naming a folder stays a command-line error.
    source = write(tmp_path, "upstream.yaml", GENERATION)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    if full_disk:

        def fail(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("trig_stream.files._sync_data", fail)
    argv = ["import-config", str(source), "-o", str(tmp_path / out), "--root", str(tmp_path)]
    assert cli.main(argv) == code
    assert message in capsys.readouterr().err


def test_command_replaces_only_a_regular_file_and_writes_through_a_link(tmp_path: Path) -> None:
    # --force renamed the new file over whatever stood at -o: a pipe (or, as root, a device
    # node) became a plain file, and so did a symbolic link, its target untouched.
    source = write(tmp_path, "up.yaml", "evaluation: {image_dirs: [imgs]}\n")
    argv = ["import-config", str(source), "--root", str(tmp_path), "--force"]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"pipe: is not a regular file \(a pipe, a device"):
        run_command([*argv, "-o", str(fifo)])
    assert stat.S_ISFIFO(fifo.lstat().st_mode)

    target = write(tmp_path, "target.toml", "keep\n")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    with pytest.raises(
        ConfigError, match=r"link\.toml \(a symbolic link to .*target\.toml\): exists"
    ):
        run_command([*argv[:-1], "-o", str(link)])
    code, messages = run_command([*argv, "-o", str(link)])
    assert code == 0 and f"wrote {link} (a symbolic link to {target})" in messages
    assert link.is_symlink() and "image_folder" in target.read_text()

    to_pipe = tmp_path / "to-pipe"
    to_pipe.symlink_to(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        run_command([*argv, "-o", str(to_pipe)])
    assert to_pipe.is_symlink() and stat.S_ISFIFO(fifo.lstat().st_mode)


def test_a_dangling_link_at_out_writes_the_file_it_names(tmp_path: Path) -> None:
    # exists() follows the link: a dangling one counted as "not there" and was replaced.
    source = write(tmp_path, "up.yaml", "evaluation: {image_dirs: [imgs]}\n")
    link = tmp_path / "link.toml"
    link.symlink_to(tmp_path / "made.toml")
    code, _ = run_command(["import-config", str(source), "-o", str(link), "--root", str(tmp_path)])
    assert code == 0
    assert link.is_symlink() and "image_folder" in (tmp_path / "made.toml").read_text()


def test_paths_written_through_a_link_to_another_folder_are_in_full(tmp_path: Path) -> None:
    # Relative to either folder, the file loaded from the other one named other folders.
    source = write(tmp_path, "up.yaml", "evaluation: {image_dirs: [imgs]}\n")
    made = tmp_path / "elsewhere" / "deeper" / "made.toml"
    made.parent.mkdir(parents=True)
    link = tmp_path / "links" / "link.toml"
    link.parent.mkdir()
    link.symlink_to(made)
    code, _ = run_command(["import-config", str(source), "-o", str(link), "--root", str(tmp_path)])
    assert code == 0
    text = made.read_text()
    assert f'path = "{(tmp_path / "imgs").as_posix()}"' in text
    assert "# Written through a symbolic link to a file in another folder" in text
    for config in (made, link):
        (generator,) = load_config(config).generators
        assert generator.options["path"] == str(tmp_path / "imgs")


def test_paths_written_through_a_link_beside_its_file_stay_relative(tmp_path: Path) -> None:
    source = write(tmp_path, "up.yaml", "evaluation: {image_dirs: [imgs]}\n")
    made = tmp_path / "made.toml"
    link = tmp_path / "link.toml"
    link.symlink_to(made.name)
    code, _ = run_command(["import-config", str(source), "-o", str(link), "--root", str(tmp_path)])
    assert code == 0
    assert 'path = "imgs"' in made.read_text()


def test_command_refuses_to_overwrite_its_own_input(tmp_path: Path) -> None:
    text = "evaluation: {image_dirs: [imgs]}\n"
    source = write(tmp_path, "up.yaml", text)
    (tmp_path / "same.yaml").symlink_to(source)
    for out in (source, tmp_path / "same.yaml", tmp_path / "." / "up.yaml"):
        argv = ["import-config", str(source), "-o", str(out), "--force"]
        with pytest.raises(ConfigError, match="is the upstream config being converted"):
            run_command(argv)
    assert source.read_text() == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "evaluation: {image_dirs: [imgs]}\ndimensions:\n  IQ-R:\n    metrics:\n"
            '      - {name: trig_api, model_name: "a\\ud800b"}\n',
            r"dimensions\.IQ-R\.metrics\[0\]\.model_name: holds half a character",
        ),
        (
            'prompt_path: "a\\ud800b"\nevaluation: {image_dirs: [imgs]}\n',
            r"prompt_path: holds half",
        ),
        ('evaluation: {image_dirs: ["im\\udc80gs"]}\n', r"evaluation\.image_dirs\[0\]: holds half"),
        (
            'prompt_path: "a\\x00b.json"\nevaluation: {image_dirs: [imgs]}\n',
            r"prompt_path: holds a NUL character",
        ),
        ('"a\\x00": 1\nevaluation: {image_dirs: [imgs]}\n', r"the key 'a\\x00' holds a NUL"),
    ],
)
def test_text_no_file_can_hold_is_refused_naming_its_key(
    tmp_path: Path, text: str, message: str
) -> None:
    # A traceback (UnicodeEncodeError, "embedded null byte"), and with -o an empty file left
    # behind, which the next try refused to overwrite.
    source = write(tmp_path, "up.yaml", text)
    out = tmp_path / "out.toml"
    argv = ["import-config", str(source), "-o", str(out), "--root", str(tmp_path)]
    for command in (argv, argv[:2]):
        with pytest.raises(ConfigError, match=rf"up\.yaml: {message}"):
            run_command(command)
    assert not out.exists()


def test_names_with_two_dots_become_names_the_run_takes(tmp_path: Path) -> None:
    # They passed import-config and validate, and the run refused them.
    out, warnings = convert_to_file(
        tmp_path, 'name: "a..b"\nevaluation: {image_dirs: ["out/x..y", "out/..z"]}\n'
    )
    config = load_config(out)
    assert config.run.name == "a.b"
    assert [g.name for g in config.generators] == ["x.y", "z"]
    assert "name: 'a..b' is not a valid run name here; using 'a.b'" in warnings


def test_a_conversion_that_does_not_validate_names_no_file_that_is_not_there(
    tmp_path: Path,
) -> None:
    # It named ".../imported.toml:35", a file that never exists.
    text = "evaluation: {image_dirs: [imgs]}\nrelation:\n  insight_thresholds:\n"
    source = write(tmp_path, "up.yaml", text + "    dominance_ratio: 1.25\n")
    with pytest.raises(ConfigError) as raised:
        import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    message = str(raised.value)
    assert f"{source} (converted): relation.dominance_ratio: Input should be less" in message
    assert "imported.toml" not in message and "out.toml" not in message


def test_a_threshold_too_large_for_a_float_is_left_out_with_a_warning(tmp_path: Path) -> None:
    # float() of it raised OverflowError: a traceback, exit 1.
    huge = "9" * 400
    text = f"evaluation: {{image_dirs: [imgs]}}\nrelation: {{thresholds: {{synergy: {huge}}}}}\n"
    out, warnings = convert_to_file(tmp_path, text)
    assert "[relation]" not in out.read_text()
    assert any(
        w.startswith("relation.thresholds.synergy: left out: 9999") and w.endswith("too large")
        for w in warnings
    )


def test_a_root_that_is_no_folder_is_warned_of(tmp_path: Path) -> None:
    source = write(tmp_path, "up.yaml", "evaluation: {image_dirs: [imgs]}\n")
    missing = tmp_path / "nowhere"
    conversion = import_config(source, out=tmp_path / "out.toml", root=missing)
    assert conversion.warnings[0].startswith(f"--root: {missing} is not a folder")
    assert f"#   - --root: {missing} is not a folder" in conversion.text
    warnings = import_config(source, out=tmp_path / "out.toml", root=tmp_path).warnings
    assert not any("--root" in w for w in warnings)


def test_a_self_referencing_upstream_config_is_looked_through_once(tmp_path: Path) -> None:
    source = write(tmp_path, "up.yaml", "loop: &a [1, *a]\nevaluation: {image_dirs: [imgs]}\n")
    conversion = import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    assert "loop: unknown upstream key, left out" in conversion.warnings


def test_command_writes_nothing_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file was opened (emptied) before the text was written: a failure left it empty.
    source = write(tmp_path, "upstream.yaml", GENERATION)
    out = tmp_path / "imported.toml"
    out.write_text("# the user's earlier config\n")

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trig_stream.files._sync_data", fail)
    argv = ["import-config", str(source), "-o", str(out), "--root", str(tmp_path), "--force"]
    with pytest.raises(ConfigError, match="cannot write the config: No space left on device"):
        run_command(argv)
    assert out.read_text() == "# the user's earlier config\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported.toml", "upstream.yaml"]


def test_command_removes_the_folders_it_made_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # new1/new2 were left behind, empty, by a config that was never written.
    source = write(tmp_path, "upstream.yaml", GENERATION)

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trig_stream.files._sync_data", fail)
    out = tmp_path / "new1" / "new2" / "imported.toml"
    with pytest.raises(ConfigError, match="cannot write the config: No space left on device"):
        run_command(["import-config", str(source), "-o", str(out), "--root", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upstream.yaml"]


def test_command_prints_to_standard_output_without_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "upstream.yaml", GENERATION)
    code, _ = run_command(["import-config", "upstream.yaml"])
    assert code == 0
    printed = capsys.readouterr().out
    assert tomllib.loads(printed)["run"]["name"] == "gen-sweep"
    assert tomllib.loads(printed)["dataset"]["path"] == f"{tmp_path.resolve()}/data/TRIG/t2i"


def test_printed_paths_hold_wherever_the_text_is_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # They were relative to the current folder, under a header saying "relative to this
    # file's folder": `import-config up.yaml > config/y.toml` pointed at config/prompts/.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "up.yaml", 'prompt_path: "prompts/p.json"\nevaluation: {image_dirs: [imgs]}\n')
    assert run_command(["import-config", "up.yaml"])[0] == 0
    printed = capsys.readouterr().out
    assert "upstream's paths are in full" in printed
    saved = write(tmp_path / "config", "y.toml", printed)
    config = load_config(saved)
    assert config.dataset.path == tmp_path.resolve() / "prompts" / "p.json"
    assert config.generators[0].options["path"] == str(tmp_path.resolve() / "imgs")


def test_a_windows_path_is_said_to_be_written_as_it_is_written(tmp_path: Path) -> None:
    # The warning said "written as it is" of a path whose backslashes became slashes.
    text = "evaluation: {image_dirs: [x]}\nimage_path: 'C:\\data\\sources'\n"
    out, warnings = convert_to_file(tmp_path, text)
    assert 'image_root = "C:/data/sources"' in out.read_text()
    assert (
        "image_path: a Windows path, written with / as C:/data/sources: check where it is on "
        "this machine" in warnings
    )


def test_a_relative_path_starting_with_a_tilde_keeps_its_meaning(tmp_path: Path) -> None:
    # Written as "~/p.json" next to the upstream root, the loader read the home folder's.
    source = write(tmp_path, "up.yaml", 'prompt_path: "~/p.json"\nimage_path: "~x"\n')
    source.write_text(source.read_text() + "evaluation: {image_dirs: [~/imgs]}\n")
    out = tmp_path / "mine.toml"
    conversion = import_config(source, out=out, root=tmp_path)
    out.write_text(conversion.text, encoding="utf-8")
    config = load_config(out)
    assert config.dataset.path == tmp_path.resolve() / "~" / "p.json"
    assert config.dataset.image_root == tmp_path.resolve() / "~x"
    assert config.generators[0].options["path"] == str(tmp_path.resolve() / "~" / "imgs")
    assert f'path = "{tmp_path.as_posix()}/~/p.json"' in conversion.text


def test_image_folder_of_a_generated_model_is_not_judged_twice(tmp_path: Path) -> None:
    text = GENERATION + 'evaluation:\n  image_dirs: ["data/output/t2i/flux", "/abs/t2i/janus"]\n'
    out, warnings = convert_to_file(tmp_path, text)
    config = load_config(out)
    backends = [(g.name, g.backend) for g in config.generators]
    assert ("flux", "diffusers") in backends and ("janus", "image_folder") in backends
    assert len(backends) == 5
    assert config.generators[-1].options["path"] == "/abs/t2i/janus"  # absolute stays so
    assert any(w.startswith("evaluation.image_dirs[data/output/t2i/flux]:") for w in warnings)


def test_a_folder_listed_twice_in_image_dirs_converts_to_one_generator(tmp_path: Path) -> None:
    # Two generators (imgs, imgs-2) over one folder judged every image twice, unsaid.
    out, warnings = convert_to_file(
        tmp_path, "evaluation: {image_dirs: [out/imgs, out/imgs/, ./out/imgs, out/other]}\n"
    )
    assert [g.name for g in load_config(out).generators] == ["imgs", "other"]
    said = [w for w in warnings if "listed again" in w]
    assert said == [
        f"evaluation.image_dirs[{folder}]: left out: the same folder as the generator "
        "'imgs', listed again"
        for folder in ("out/imgs/", "./out/imgs")
    ]


@pytest.mark.parametrize("printed", [False, True], ids=["written", "printed"])
def test_a_folder_listed_relative_and_in_full_converts_to_one_generator(
    tmp_path: Path, printed: bool
) -> None:
    # Written to a file, one was relative to it and the other in full: two generators (a,
    # a-2) judged every image twice.
    root = tmp_path / "upstream"
    source = write(root, "up.yaml", f"evaluation: {{image_dirs: [out/a, {root}/out/a]}}\n")
    out = None if printed else tmp_path / "mine" / "run.toml"
    conversion = import_config(source, out=out, root=root)
    assert [g.name for g in conversion.config.generators] == ["a"]
    assert (
        f"evaluation.image_dirs[{root}/out/a]: left out: the same folder as the generator "
        "'a', listed again"
    ) in conversion.warnings


def test_image_dirs_that_are_no_folder_are_left_out_with_a_warning(tmp_path: Path) -> None:
    # They became generators named "None" and "5" reading folders of those names.
    text = 'task: t2i\nevaluation:\n  image_dirs: [null, 5, "", "out/t2i/flux"]\n'
    out, warnings = convert_to_file(tmp_path, text)
    assert [g.name for g in load_config(out).generators] == ["flux"]
    assert "evaluation.image_dirs[0]: left out: not a folder: None" in warnings
    assert "evaluation.image_dirs[1]: left out: not a folder: 5" in warnings
    assert "evaluation.image_dirs[2]: left out: not a folder: ''" in warnings
    with pytest.raises(ConfigError, match="nothing to evaluate") as raised:
        convert_to_file(tmp_path, "task: t2i\nevaluation:\n  image_dirs: 7\n")
    assert "evaluation.image_dirs: left out: expected folders, got 7" in str(raised.value)


@pytest.mark.parametrize(("models", "shown"), [("5", "5"), ("true", "True"), ("1.5", "1.5")])
def test_models_that_are_no_list_of_aliases_are_left_out_with_a_warning(
    tmp_path: Path, models: str, shown: str
) -> None:
    # They ended the command with a TypeError traceback (exit 1).
    text = f"task: t2i\ngeneration: {{models: {models}}}\nevaluation: {{image_dirs: [out/a]}}\n"
    out, warnings = convert_to_file(tmp_path, text)
    assert [g.name for g in load_config(out).generators] == ["a"]
    assert f"generation.models: left out: expected model aliases, got {shown}" in warnings


def test_models_given_as_a_mapping_warn_of_each_model_s_settings(tmp_path: Path) -> None:
    # Each model's settings were dropped in silence: only the aliases were read.
    text = "task: t2i\ngeneration:\n  models: {flux: {steps: 20, seed: 7}, sana: null}\n"
    out, warnings = convert_to_file(tmp_path, text)
    assert [g.name for g in load_config(out).generators] == ["flux", "sana"]
    settings = [w for w in warnings if "settings" in w]
    assert settings == [
        "generation.models[flux]: left out: its settings {'seed': 7, 'steps': 20}: the preset's "
        "own are used; set a diffusers generator's options by hand"
    ]


def test_an_editing_model_without_image_path_is_warned_of_an_image_folder_not(
    tmp_path: Path,
) -> None:
    # Upstream's own p2p evaluation config names no image_path: its image_dirs are judged
    # alone, so no warning; a model that edits the sources needs them looked up.
    judged = 'task: p2p\nprompt_path: "p2p.json"\nevaluation:\n  image_dirs: ["edits"]\n'
    _, warnings = convert_to_file(tmp_path, judged)
    assert not [w for w in warnings if w.startswith("image_path")]
    models = 'generation:\n  models: ["instructp2p", "hqedit_dtm_dim"]\n'
    _, warnings = convert_to_file(tmp_path, judged + models)
    (warning,) = [w for w in warnings if w.startswith("image_path")]
    assert "instructp2p, hqedit_dtm_dim edit(s) each sample's source image (p2p)" in warning
    assert "add image_path" in warning
    _, warnings = convert_to_file(tmp_path, judged + models + 'image_path: "src"\n')
    assert not [w for w in warnings if w.startswith("image_path")]


@pytest.mark.parametrize("depth", [500, 5000])
def test_an_upstream_config_nested_too_deep_is_refused_in_one_line(
    tmp_path: Path, depth: int
) -> None:
    # The YAML reader recursed past Python's limit: a RecursionError traceback, exit 1.
    text = "name: x\ngeneration: {models: [flux]}\ndeep: " + "[" * depth + "]" * depth + "\n"
    source = write(tmp_path, "deep.yaml", text)
    with pytest.raises(ConfigError, match=r"nested too deep to read .*a config needs a few"):
        import_config(source, out=tmp_path / "out.toml", root=tmp_path)


class CountedList(list[object]):
    """A list that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Iterator[object]:
        CountedList.walks += 1
        return super().__iter__()


def test_a_list_that_yaml_aliases_share_is_walked_once() -> None:
    # Nine aliases on each of eight levels (`b: &b [*a, *a, ...]`) walked the innermost list
    # 9**8 times: import-config spent a minute on a 1 KB file.
    CountedList.walks = 0
    shared: list[object] = CountedList(["lol\udc80"] * 9)
    for _ in range(3):
        shared = [shared] * 9
    assert len(list(unusable_entries(shared))) == 9  # each of its items, once
    assert CountedList.walks == 1


def test_a_shared_value_is_refused_once_and_a_cycle_still_ends() -> None:
    bad: list[object] = ["lol\udc80"]
    cycle: list[object] = [bad, bad]
    cycle.append(cycle)
    assert [loc for loc, _, _ in unusable_entries({"a": cycle})] == [("a", 0, 0)]


ALIAS_BOMB = "".join(
    ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n']
    + [f"lol{n}: &lol{n} [{', '.join([f'*lol{n - 1}'] * 9)}]\n" for n in range(1, 6)]
)
"""Nine aliases on each of five levels: a list of 9**6 strings, 4 MB as its repr, in 500 bytes
of YAML (the billion laughs, made small enough to fail fast; at nine levels it filled memory)."""


@pytest.mark.parametrize(
    "placed",
    [
        "name: *lol5",
        "dataset_name: *lol5",
        "start_idx: *lol5",
        "end_idx: *lol5",
        "evaluation: {image_dirs: [x], result_dir: *lol5}",
        "evaluation: {image_dirs: [x], image_dir: {a: *lol5}}",
        "evaluation: {image_dirs: [x, *lol5]}",
        "generation: {models: [flux, *lol5]}",
        "relation: {metric: *lol5}",
        "relation: {thresholds: {synergy: *lol5}}",
        "dimensions: {IQ-R: {metrics: [*lol5]}}",
        "dimensions: {IQ-R: {metrics: [{name: *lol5}]}}",
        "dimensions: {IQ-R: {metrics: [{name: trig_api, model_name: *lol5}]}}",
        "dimensions: {IQ-R: {metrics: [{name: trig_api, top_logprobs: *lol5}]}}",
        "dimensions: {IQ-R: {metrics: [{name: trig_api, API_KEY: *lol5}]}}",
    ],
)
def test_a_yaml_alias_bomb_in_a_warned_value_is_shown_cut_short(
    tmp_path: Path, placed: str
) -> None:
    # Each warning showed the whole value: nine levels of aliases in a 1 KB file ate memory
    # until the command was killed.
    text = ALIAS_BOMB + "evaluation: {image_dirs: [x]}\n" + placed + "\n"
    _, warnings = convert_to_file(tmp_path, text)
    assert max(len(w) for w in warnings) < 1000
    if "API_KEY" not in placed:  # a key is never shown
        assert [w for w in warnings if "..." in w]


@pytest.mark.parametrize(
    "placed",
    [
        "task: *lol5",
        "prompt_path: *lol5",
        "dimensions: {IQ-R: {metrics: [{name: trig_api, endpoint: *lol5}]}}",
    ],
)
def test_a_yaml_alias_bomb_in_a_refused_value_is_shown_cut_short(
    tmp_path: Path, placed: str
) -> None:
    source = write(tmp_path, "up.yaml", ALIAS_BOMB + "evaluation: {image_dirs: [x]}\n" + placed)
    with pytest.raises(ConfigError) as raised:
        import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    assert len(str(raised.value)) < 1000
    assert "..." in str(raised.value)


def test_command_writes_an_output_whose_name_is_near_the_limit(tmp_path: Path) -> None:
    # "cannot write the config: File name too long" (exit 3) for a 250-byte name: the
    # temporary file's name was longer.
    source = write(tmp_path, "up.yaml", GENERATION)
    out = tmp_path / ("c" * 245 + ".toml")
    code, _ = run_command(["import-config", str(source), "-o", str(out), "--root", str(tmp_path)])
    assert code == 0
    assert tomllib.loads(out.read_text())["run"]["name"] == "gen-sweep"


def test_a_model_listed_twice_converts_once_and_image_folders_match_aliases(
    tmp_path: Path,
) -> None:
    # flux listed twice became flux (cuda:0) and flux-2 (cuda:1), unsaid; out/flux-2 was then
    # left out as "generated by this run", which no model is.
    text = "generation: {models: [flux, flux, sd35]}\nevaluation: {image_dirs: [out/flux-2]}\n"
    out, warnings = convert_to_file(tmp_path, text)
    generators = load_config(out).generators
    assert [(g.name, g.backend) for g in generators] == [
        ("flux", "diffusers"),
        ("sd35", "diffusers"),
        ("flux-2", "image_folder"),
    ]
    assert [g.options.get("devices") for g in generators[:2]] == [["cuda:0"], ["cuda:1"]]
    assert (
        "generation.models[flux]: left out: listed again; the generator 'flux' makes its "
        "images once"
    ) in warnings
    assert not any(w.startswith("evaluation.image_dirs") for w in warnings)


def test_end_idx_converted_to_limit_says_it_counts_samples_not_positions(tmp_path: Path) -> None:
    # limit = 2 beside dimensions = ["IQ-R", "TA-C"] judged IQ-R_TA-C_1 and IQ-R_TA-C_2, unsaid,
    # where upstream's first two records are IQ-R_TA-C_1 and IQ-A_TA-S_1.
    metric = '{metrics: [{name: trig_api, model_name: m, endpoint: "http://127.0.0.1:1/v1/"}]}'
    text = (
        "prompt_path: prompts.json\nstart_idx: 0\nend_idx: 2\n"
        f"evaluation: {{image_dirs: [imgs/m]}}\ndimensions: {{IQ-R: {metric}, TA-C: {metric}}}\n"
    )
    out, warnings = convert_to_file(tmp_path, text)
    dataset = load_config(out).dataset
    assert (dataset.limit, dataset.dimensions) == (2, ["IQ-R", "TA-C"])
    assert (
        "end_idx: became [dataset] limit = 2, a count of samples, not a position: upstream "
        "judges records 0 to 1, the run the first 2 records that [dataset] dimensions keeps "
        "and that are valid, past upstream's end where one is left out; check the samples "
        "`trig-stream validate` lists, or cut the dataset to its first 2 records and remove "
        "limit"
    ) in warnings
    _, warnings = convert_to_file(tmp_path, GENERATION)  # no filter: quarantine alone
    assert any(w.startswith("end_idx: became [dataset] limit = 120") for w in warnings)
    assert any("the first 120 records that are valid" in w for w in warnings)


def test_an_end_idx_past_toml_s_integers_is_left_out_with_a_warning(tmp_path: Path) -> None:
    # It was written as limit = 99999999999999999999999, which TOML's 64-bit integers cannot
    # hold: other TOML readers refuse the file.
    out, warnings = convert_to_file(
        tmp_path, "end_idx: 99999999999999999999999\nevaluation: {image_dirs: [x]}\n"
    )
    assert load_config(out).dataset.limit is None
    assert (
        "end_idx: left out: 99999999999999999999999 is past the largest TOML integer "
        "(2**63 - 1): every record is read, as upstream reads them"
    ) in warnings


# A hexadecimal YAML integer of 16,000 bits: read whatever its length, but past the digits
# Python writes in decimal (4,300 by default).
HUGE_INT = "0x" + "f" * 4000


@pytest.mark.parametrize(
    ("placed", "key"),
    [
        pytest.param(f"end_idx: {HUGE_INT}", "end_idx", id="end_idx"),
        pytest.param(f"start_idx: {HUGE_INT}", "start_idx", id="start_idx"),
        pytest.param(
            f"relation: {{thresholds: {{synergy: {HUGE_INT}}}}}",
            "relation.thresholds.synergy",
            id="threshold",
        ),
        pytest.param(f"generation: {{models: {HUGE_INT}}}", "generation.models", id="models"),
        pytest.param(
            f"generation: {{models: [flux, {HUGE_INT}]}}", "generation.models[1]", id="a-model"
        ),
        pytest.param(
            f"dimensions: {{IQ-R: {{metrics: [{{name: trig_api, model_name: {HUGE_INT}}}]}}}}",
            "",
            id="model_name",
        ),
        pytest.param(
            f"dimensions: {{IQ-R: {{metrics: [{{name: trig_api, top_logprobs: {HUGE_INT}}}]}}}}",
            "",
            id="top_logprobs",
        ),
        pytest.param(f"? {HUGE_INT}\n: 1", "", id="top-level-key"),
        pytest.param(
            f"dimensions:\n  ? {HUGE_INT}\n  : {{metrics: []}}", "dimensions.", id="dimension-key"
        ),
        pytest.param(
            f"dimensions: {{IQ-R: {{metrics: [{{name: trig_api, ? {HUGE_INT} : 1}}]}}}}",
            "",
            id="metric-key",
        ),
        pytest.param(f"relation:\n  ? {HUGE_INT}\n  : 1", "relation.", id="relation-key"),
        pytest.param(
            f"relation: {{thresholds: {{? {HUGE_INT} : 1}}}}",
            "relation.thresholds.",
            id="threshold-key",
        ),
        pytest.param(
            f"generation: {{models: [flux], ? {HUGE_INT} : 1}}", "generation.", id="generation-key"
        ),
        pytest.param(
            f"evaluation: {{image_dirs: [x], ? {HUGE_INT} : 1}}", "evaluation.", id="evaluation-key"
        ),
        pytest.param(
            f"generation: {{models: {{? {HUGE_INT} : x}}}}", "generation.models[", id="alias-key"
        ),
        pytest.param(
            f"dimensions: {{IQ-R: {{metrics: [], ? {HUGE_INT} : 1}}}}",
            "dimensions.IQ-R.",
            id="dimension-spec-key",
        ),
    ],
)
def test_an_integer_too_long_to_write_is_shown_by_its_length(
    tmp_path: Path, placed: str, key: str
) -> None:
    # Each warning naming it, or its key, ended in a traceback: "Exceeds the limit (4300
    # digits) for integer string conversion".
    text = placed + "\n" + ("" if "evaluation" in placed else "evaluation: {image_dirs: [x]}\n")
    _, warnings = convert_to_file(tmp_path, text)
    assert [w for w in warnings if w.startswith(key) and "<an integer of 16,000 bits>" in w]


@pytest.mark.parametrize(
    ("placed", "refused"),
    [
        pytest.param(f"task: {HUGE_INT}", "task: <an integer of 16,000 bits> has no", id="task"),
        pytest.param(
            f'? {HUGE_INT}\n: "a\\0b"', '"<an integer of 16,000 bits>": holds a NUL', id="key"
        ),
    ],
)
def test_an_integer_too_long_to_write_is_refused_showing_its_length(
    tmp_path: Path, placed: str, refused: str
) -> None:
    source = write(tmp_path, "up.yaml", f"{placed}\nevaluation: {{image_dirs: [x]}}\n")
    with pytest.raises(ConfigError) as raised:
        import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    assert refused in str(raised.value)


def test_a_run_name_taken_from_the_file_name_is_said_to_come_from_it(tmp_path: Path) -> None:
    # "name: 'my cfg (v2)' is not a valid run name" read as if the YAML had a name key.
    source = write(tmp_path, "my cfg (v2).yaml", "evaluation: {image_dirs: [imgs]}\n")
    conversion = import_config(source, out=tmp_path / "out.toml", root=tmp_path)
    assert (
        "name: the file name 'my cfg (v2)', standing in for it, is not a valid run name here; "
        "using 'my-cfg-v2'"
    ) in conversion.warnings
