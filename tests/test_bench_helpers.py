"""Helpers of the benchmark scripts that are cheap to test: the goal checks
(``bench/_goal.py``: a missed goal is exit status 1) and R1's comparison of journals."""

from __future__ import annotations

import argparse
import importlib.util
import math
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from trig_stream.records import JudgeFingerprint, Judgement

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def load_bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Load a bench script's module from its file (bench/ is scripts, not a package); what
    the scripts add to ``sys.path`` and ``sys.modules`` (their ``_common`` and so on) goes
    again afterwards, and so do the stop handlers a bench's ``main`` installs
    (``stop_on_sigterm``)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    yield load
    for name in set(sys.modules) - before:
        if name.startswith("bench_") or name in {"_common", "_goal", "_server"}:
            del sys.modules[name]
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def finish_status(goals: Any) -> object:
    with pytest.raises(SystemExit) as stopped:
        goals.finish()
    return stopped.value.code


def test_all_goals_met_exit_0(
    load_bench: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    goals = load_bench("_goal").Goals()
    assert goals.at_most("P6 first new request", 2.5, 3.0, " s")
    assert goals.at_least("P2 speed-up", 41.0, 40, "x")
    assert goals.equal("requests received", 200, 200)
    assert finish_status(goals) == 0
    out = capsys.readouterr().out
    assert "P6 first new request <= 3 s: 2.500 s -> MET" in out
    assert "MET: all 3 goals" in out


def test_a_missed_goal_exits_1_and_is_named(
    load_bench: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    goals = load_bench("_goal").Goals()
    goals.at_most("P3 CPU per judgement", 0.4, 0.5, " ms")
    assert not goals.equal("requests received", 1100, 200)
    assert finish_status(goals) == 1
    out = capsys.readouterr().out
    assert "requests received == 200: 1100 -> NOT MET" in out
    assert "NOT MET: 1 of 2 goals: requests received == 200 (1100)" in out


@pytest.mark.parametrize("check", ["at_most", "at_least"])
def test_nothing_measured_is_a_miss(load_bench: Callable[[str], ModuleType], check: str) -> None:
    goals = load_bench("_goal").Goals()
    assert not getattr(goals, check)("first request", math.nan, 3.0)
    assert finish_status(goals) == 1


def test_not_measured_is_neither_met_nor_missed(
    load_bench: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    goals = load_bench("_goal").Goals()
    goals.not_measured("R2 flat", "4 samples needed")
    goals.equal("judgements made", 10, 10)
    assert finish_status(goals) == 0
    assert "R2 flat: NOT MEASURED (4 samples needed)" in capsys.readouterr().out


def test_no_goal_checked_is_a_miss(load_bench: Callable[[str], ModuleType]) -> None:
    assert finish_status(load_bench("_goal").Goals()) == 1


def write_journal(path: Path, judgements: list[Judgement]) -> Path:
    path.write_text("".join(j.model_dump_json() + "\n" for j in judgements))
    return path


def judgements(*data_ids: str) -> list[Judgement]:
    judge = JudgeFingerprint(backend="fake", model="j")
    return [
        Judgement(
            model="a",
            data_id=data_id,
            task="t2i",
            pair="IQ-R_TA-C",
            dimension=dimension,
            metric="trigscore",
            judge=judge,
            status="ok",
            score=0.5,
        )
        for data_id in data_ids
        for dimension in ("IQ-R", "TA-C")
    ]


def test_kill_resume_counts_a_key_the_uninterrupted_run_lacks(
    load_bench: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    compare = load_bench("kill_resume").compare
    reference = write_journal(tmp_path / "reference.jsonl", judgements("IQ-R_TA-C_1"))
    same = write_journal(tmp_path / "same.jsonl", judgements("IQ-R_TA-C_1"))
    more = write_journal(tmp_path / "more.jsonl", judgements("IQ-R_TA-C_1", "IQ-R_TA-C_999"))
    assert compare(same, reference).extra == 0
    found = compare(more, reference)
    # Nothing doubled, missing or differing, the DTM the same: only
    # the count of extra keys tells this run from the uninterrupted one.
    assert (found.doubled, found.missing, found.differ, found.extra) == (0, 0, 0, 2)
    assert found.same_dtm


def test_kill_resume_counts_only_kills_after_new_judgements(
    load_bench: Callable[[str], ModuleType],
) -> None:
    tally = load_bench("kill_resume").KillTally(wanted=2)
    # Killed while the run still loaded: the journal as empty as at the start.
    assert not tally.record(0, 0)
    assert tally.record(0, 40)
    assert not tally.record(40, 40)
    assert not tally.done()
    assert tally.record(40, 95)
    assert (tally.starts, tally.effective) == (4, 2)
    assert tally.done() and not tally.gave_up()


def test_kill_resume_gives_up_after_kills_in_a_row_that_judge_nothing(
    load_bench: Callable[[str], ModuleType],
) -> None:
    tally = load_bench("kill_resume").KillTally(wanted=3, most_idle=2)
    assert tally.record(0, 10)
    assert not tally.record(10, 10)
    assert tally.record(10, 20)  # a kill that counts starts the idle count again
    assert not tally.record(20, 20)
    assert not tally.done()
    assert not tally.record(20, 20)
    assert tally.done() and tally.gave_up() and tally.effective == 2


def test_engine_cpu_run_that_judged_nothing_measures_nothing(
    load_bench: Callable[[str], ModuleType],
) -> None:
    engine_cpu = load_bench("engine_cpu")
    assert engine_cpu.ms_per_judgement(0.8, 2000) == pytest.approx(0.4)
    assert math.isnan(engine_cpu.ms_per_judgement(0.8, 0))
    times = engine_cpu.ThreadTimes()
    times.loop_s = 0.5
    times.calls["write"] = 0.25
    assert times.line(1000) == "ms per judgement by thread: event loop 0.500, write 0.250"
    assert times.line(0) == "ms per judgement by thread: none judged"


def test_a_judge_server_that_does_not_start_is_a_message_with_its_reason(
    load_bench: Callable[[str], ModuleType],
) -> None:
    start_judge = load_bench("_server").start_judge
    with pytest.raises(SystemExit) as stopped:
        start_judge("--capacity", "0", "--latency", "0")
    message = str(stopped.value.code)
    assert message.startswith("simulate-judge did not start: ")
    assert "capacity: Input should be greater than or equal to 1" in message
    assert "--capacity 0 --latency 0" in message


def test_gpu_check_loop_calls_the_pipeline_from_a_worker_thread_as_the_engine_does(
    load_bench: Callable[[str], ModuleType],
) -> None:
    pytest.importorskip("torch")
    threads: list[threading.Thread] = []

    class Generator:
        def generate(self, requests: list[Any], worker: int, cancel: threading.Event) -> None:
            threads.append(threading.current_thread())

    rate = load_bench("generators_gpu_check").throughput(Generator(), 2, 4, "cpu")
    assert rate > 0
    assert len(threads) == 3  # the warm-up and two batches
    assert threading.main_thread() not in threads


def test_soak_requires_the_server_slots_full_when_the_latency_allows(
    load_bench: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    soak = load_bench("soak")
    goals = soak.Goals()
    soak.check_slots(goals, 0.25, 152)
    assert finish_status(goals) == 1
    assert "max running (server /stats) == 256: 152 -> NOT MET" in capsys.readouterr().out
    goals = soak.Goals()
    soak.check_slots(goals, 0.25, 256)
    assert finish_status(goals) == 0
    goals = soak.Goals()
    soak.check_slots(goals, 0.05, 152)
    goals.equal("judgements made (all ok)", 4000, 4000)
    assert finish_status(goals) == 0
    assert "NOT MEASURED (--latency 0.05 s, under 0.25 s)" in capsys.readouterr().out


def test_kill_resume_counts_temporary_files_over_the_whole_run_directory(
    load_bench: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    leftovers_of = load_bench("kill_resume").Leftovers.of
    run_dir = tmp_path / "killed"
    (run_dir / "images" / "a").mkdir(parents=True)
    (run_dir / "images" / "a" / "IQ-R_TA-C_1.png").write_bytes(b"png")
    (run_dir / "journal.jsonl").write_text("")
    assert leftovers_of(run_dir).all_files() == []
    # What a kill -9 may leave where the next run clears it.
    (run_dir / "images" / ".partial").mkdir()
    partial_image = run_dir / "images" / ".partial" / ".IQ-R_TA-C_2.png.7.8.tmp"
    partial_image.write_bytes(b"p")
    (run_dir / "quarantine.jsonl.partial").write_text("")
    manifest_temp = run_dir / ".manifest.json.7.8.tmp"  # removed when a run opens
    manifest_temp.write_text("{")
    # Temporary files of atomic writes elsewhere, which no run removes.
    stray_image = run_dir / "images" / "a" / ".IQ-R_TA-C_3.png.7.8.tmp"
    stray_image.write_bytes(b"p")
    stray_other = run_dir / ".notes.json.7.8.tmp"
    stray_other.write_text("{")
    found = leftovers_of(run_dir)
    assert found.cleared == [
        partial_image,
        manifest_temp,
        run_dir / "quarantine.jsonl.partial",
    ]
    assert sorted(found.stray) == sorted([stray_other, stray_image])
    assert len(found.all_files()) == 5


def test_gpu_check_makes_a_missing_out_folder_before_measuring(
    load_bench: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    report_file = load_bench("generators_gpu_check").report_file
    assert report_file(None) is None and report_file("") is None
    out = tmp_path / "not" / "yet"
    assert report_file(str(out)) == out / "generators_gpu_check.json"
    assert out.is_dir()
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(SystemExit) as stopped:
        report_file(str(taken / "out"))
    message = str(stopped.value.code)
    assert message.startswith(f"OUT={taken / 'out'} cannot hold the report (")
    assert "set OUT to a folder that can be made, or unset it" in message


@pytest.mark.parametrize(
    ("bench", "check", "minimum", "missed", "option"),
    [
        ("judge_throughput", "check_speed_up", 2000, 28.0, "--images"),
        ("tui_overhead", "check_ratio", 4000, 0.489, "--samples"),
    ],
)
def test_a_run_too_small_leaves_the_goal_not_measured(
    load_bench: Callable[[str], ModuleType],
    capsys: pytest.CaptureFixture[str],
    bench: str,
    check: str,
    minimum: int,
    missed: float,
    option: str,
) -> None:
    module = load_bench(bench)
    goals = module.Goals()
    getattr(module, check)(goals, minimum // 4, missed)
    goals.equal("ok judgements", 1000, 1000)
    assert finish_status(goals) == 0
    out = capsys.readouterr().out
    assert f"NOT MEASURED ({option} {minimum // 4}, under {minimum}: too small" in out
    assert f"run {option} {minimum})" in out
    # At the goal's size, the same result misses it.
    goals = module.Goals()
    getattr(module, check)(goals, minimum, missed)
    assert finish_status(goals) == 1


def test_soak_refuses_an_odd_count_of_judgements(load_bench: Callable[[str], ModuleType]) -> None:
    judgements = load_bench("soak").judgements
    assert judgements("1000") == 1000
    for odd in ("1001", "1", "0", "-2"):
        with pytest.raises(argparse.ArgumentTypeError, match="each prompt makes two"):
            judgements(odd)


def test_dtm_refresh_help_measures_nothing(
    load_bench: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dtm_refresh = load_bench("dtm_refresh")

    def measured(count: int, seed: int = 0) -> list[Judgement]:
        raise AssertionError("--help ran the benchmark")

    monkeypatch.setattr(dtm_refresh, "make_judgements", measured)
    monkeypatch.setattr(sys, "argv", ["dtm_refresh.py", "--help"])
    with pytest.raises(SystemExit) as stopped:
        dtm_refresh.main()
    assert stopped.value.code == 0
    assert "--judgements" in capsys.readouterr().out


def test_soak_flatness_leaves_out_the_sample_at_the_last_judgement(
    load_bench: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    soak = load_bench("soak")
    # (judgements, seconds, RSS MiB, open descriptors): 258 descriptors leak from 1000 to
    # 2000 judgements, and the sample at the last judgement, 2500, came after the judge had
    # closed its connections, as the one after the run did.
    samples = [
        (0, 0.0, 90.0, 13),
        (500, 1.0, 110.0, 274),
        (1000, 2.0, 111.0, 274),
        (1500, 3.0, 111.0, 403),
        (2000, 4.0, 111.0, 532),
        (2500, 5.0, 111.0, 15),
        (2500, 5.5, 111.0, 13),
    ]
    assert [s[0] for s in soak.running_samples(samples, 2500)] == [500, 1000, 1500, 2000]
    goals = soak.Goals()
    soak.check_flat(goals, samples, 2500)
    assert finish_status(goals) == 1
    out = capsys.readouterr().out
    assert "R2 open descriptors' growth from 1000 to 2000 judgements <= 4: 258 -> NOT MET" in out
    # Four samples before the last judgement are needed: --items over 4 x --every.
    goals = soak.Goals()
    soak.check_flat(goals, samples[:4] + samples[-2:], 2500)
    goals.equal("judgements made (all ok)", 2500, 2500)
    assert finish_status(goals) == 0
    assert "3 samples, 4 needed: --items > 4 x --every" in capsys.readouterr().out


def test_readme_figures_stopped_with_sigterm_removes_its_temporary_folder(tmp_path: Path) -> None:
    noted = tmp_path / "folder"
    # The bench's first figure notes its temporary folder, then SIGTERM stops the bench.
    script = (
        "import importlib.util, os, signal, sys\n"
        "spec = importlib.util.spec_from_file_location(\n"
        f"    'figures', {str(BENCH / 'readme_figures.py')!r}\n"
        ")\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "def stopped(folder, repeats):\n"
        f"    open({str(noted)!r}, 'w').write(str(folder))\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "module.reuse_figures = stopped\n"
        "sys.argv = ['readme_figures.py', '--no-demo', '--repeats', '1']\n"
        "module.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != -signal.SIGTERM, "SIGTERM ended the bench on the spot"
    assert "KeyboardInterrupt" in done.stderr
    folder = Path(noted.read_text())
    assert folder.name and not folder.exists()


def test_readme_figures_children_are_stopped_with_the_bench(
    load_bench: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel's parent-death signal is Linux's")
    # The signal the kernel sends the child when the bench dies (prctl PR_GET_PDEATHSIG).
    asked = tmp_path / "asked"
    child = (
        "import ctypes, sys\n"
        "signum = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(signum))\n"
        "open(sys.argv[1], 'w').write(str(signum.value))\n"
    )
    load_bench("readme_figures").command_seconds([sys.executable, "-c", child, str(asked)])
    assert asked.read_text() == str(int(signal.SIGTERM))


@pytest.mark.parametrize(
    ("runs", "reason"),
    [
        ("threads:1", "isolation 'threads' is not thread or process"),
        ("thread", "'thread' is not isolation:batch_size (thread:8, say)"),
        ("thread:1,process:0", "batch size '0' is not a positive whole number"),
        ("process:eight", "batch size 'eight' is not a positive whole number"),
    ],
)
def test_gpu_check_refuses_bad_runs_before_building_anything(
    load_bench: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    runs: str,
    reason: str,
) -> None:
    gpu_check = load_bench("generators_gpu_check")

    def built(*args: object) -> Path:
        raise AssertionError("the pipeline was built before --runs was checked")

    monkeypatch.setattr(gpu_check, "build_mid_flux", built)
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(sys, "argv", ["generators_gpu_check.py", "--device", "cpu", "--runs", runs])
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main()
    assert stopped.value.code == 2
    assert f"--runs: {reason}" in capsys.readouterr().err


def test_gpu_check_reads_its_runs(load_bench: Callable[[str], ModuleType]) -> None:
    engine_runs = load_bench("generators_gpu_check").engine_runs
    assert engine_runs("thread:1,process:8") == [("thread", 1), ("process", 8)]


def test_gpu_check_makes_more_images_than_each_default_batch(
    load_bench: Callable[[str], ModuleType],
) -> None:
    # The engine's rate runs from the first batch's last judgement to the last batch's: a
    # run of one batch (8 images at batch 8 on the CPU) gave null for it and engine_vs_loop.
    gpu_check = load_bench("generators_gpu_check")
    largest = max(batch for _, batch in gpu_check.engine_runs(gpu_check.DEFAULT_RUNS))
    for device, (*_, images) in gpu_check.SIZES.items():
        assert images >= 2 * largest, device


@pytest.mark.parametrize("kind", ["folder", "dangling-link"])
def test_generators_overhead_refuses_a_one_folder_that_exists(
    load_bench: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    kind: str,
) -> None:
    overhead = load_bench("generators_overhead")
    taken = tmp_path / "loop-64-1-0"
    if kind == "folder":
        taken.mkdir()
    else:  # Path.exists() follows it: the run made its folder there, FileExistsError
        taken.symlink_to(tmp_path / "gone")
    one = ["--one", "loop", "1", "64", "2", str(tmp_path / "flux-tiny"), str(taken)]
    monkeypatch.setattr(sys, "argv", ["generators_overhead.py", *one])
    with pytest.raises(SystemExit) as stopped:
        overhead.main()
    # Not resumed: the old run's images would be taken as made, and none made anew.
    assert stopped.value.code == f"--one: {taken} exists; give a folder that does not"


def test_engine_memory_shows_what_a_failed_run_wrote_to_stderr(
    load_bench: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine_memory = load_bench("engine_memory")
    monkeypatch.setattr(engine_memory, "PEAK", "import sys; sys.exit('no space left on device')")
    with pytest.raises(SystemExit) as stopped:
        engine_memory.one(14, tmp_path)
    message = str(stopped.value.code)
    assert message.startswith("the run of 14 prompts failed (exit status 1): ")
    assert message.endswith("no space left on device")


def test_gpu_check_sets_torch_threads_for_the_loop_and_the_engine_alike(
    load_bench: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    gpu_check = load_bench("generators_gpu_check")
    seen: list[int] = []

    class Built(Exception):
        pass

    def built(*args: object) -> Path:
        # Before the pipeline is built, loaded or called: the loop and the engine alike.
        seen.append(torch.get_num_threads())
        raise Built

    monkeypatch.setattr(gpu_check, "build_mid_flux", built)
    # Importing diffusers takes seconds, and main only quiets its log before the build.
    quiet = SimpleNamespace(logging=SimpleNamespace(set_verbosity_error=lambda: None))
    monkeypatch.setitem(sys.modules, "diffusers", SimpleNamespace(utils=quiet, __version__="0"))
    monkeypatch.delenv("OUT", raising=False)
    argv = ["generators_gpu_check.py", "--device", "cpu", "--threads", "1", "--runs", "thread:1"]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Built):
            gpu_check.main()
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]
