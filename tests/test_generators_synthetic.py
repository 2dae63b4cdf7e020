"""The synthetic generator's options and its calls."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.conftest import run_and_dataset_toml
from trig_stream.backends.base import GenerationRequest
from trig_stream.records import Sample
from trig_stream.testing.synthetic import SyntheticGenerator, SyntheticOptions


class CountingEvent(threading.Event):
    """An event that counts the looks at it: each is one pass of a generate call's loop."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return super().is_set()


def test_a_call_without_latency_does_not_loop_over_its_steps() -> None:
    # With latency_s = 0 the call still went through every step: steps = 2**63 - 1 kept it
    # (and the run, whose graceful stop lets a call finish) busy for ever.
    generator = SyntheticGenerator("g", SyntheticOptions(size=8, steps=10_000))
    sample = Sample(data_id="IQ-R_TA-C_1", task="t2i", prompt="a cat", dimensions=("IQ-R", "TA-C"))
    cancel = CountingEvent()
    (image,) = generator.generate([GenerationRequest("g", sample, 1)], worker=0, cancel=cancel)
    assert not isinstance(image, Exception)
    assert cancel.looks == 1


@pytest.mark.parametrize("steps", ["9223372036854775807", "10001"])
def test_validate_refuses_steps_past_the_bound_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], steps: str
) -> None:
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_CONFIG

    path = tmp_path / "run.toml"
    path.write_text(
        run_and_dataset_toml(tmp_path) + '[[generators]]\nname = "g"\nbackend = "synthetic"\n'
        f"options = {{ size = 16, latency_s = 0.0, steps = {steps} }}\n"
        '[[judges]]\nbackend = "fake"\n'
    )
    assert main(["validate", str(path)]) == EXIT_CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert "generators[0].options.steps:" in err and "10000" in err
