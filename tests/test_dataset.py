"""Reading TRIG datasets: both formats, filters, limits and quarantine."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from PIL import Image

from tests.conftest import count_reads, write_prompts
from trig_stream.backends.generators.source_images import source_image
from trig_stream.config import DatasetSection
from trig_stream.dataset import DatasetSource
from trig_stream.dimensions import normalise_task
from trig_stream.errors import DatasetError, DatasetInterrupted
from trig_stream.hashing import sample_digest
from trig_stream.records import QuarantinedRecord, RecordedPair, Sample


def png_bytes(colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def read(
    section: DatasetSection, task: str = "t2i"
) -> tuple[list[Sample], list[QuarantinedRecord]]:
    samples: list[Sample] = []
    refused: list[QuarantinedRecord] = []
    for entry in DatasetSource(section, normalise_task(task)):
        if isinstance(entry, QuarantinedRecord):
            refused.append(entry)
        else:
            samples.append(entry)
    return samples, refused


def test_legacy_json_with_dimension_key(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "p.json", 8, key="dimension")
    samples, refused = read(DatasetSection(path=path))
    assert len(samples) == 8 and not refused
    assert samples[2].dimensions == ("R-T", "IQ-A")  # order as given, not canonical
    assert samples[2].pair == "R-T_IQ-A"


def test_parquet_folder_with_dimensions_key_and_embedded_images(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for part in range(2):
        pl.DataFrame(
            {
                "data_id": [f"TA-C_TA-R_{part * 3 + i + 1}" for i in range(3)],
                "prompt": ["make the edit"] * 3,
                "dimensions": [["TA-C", "TA-R"]] * 3,
                "dimension_prompt": [["a", "b"]] * 3,
                "parent_dataset": [["x", "y"]] * 3,
                "img_id": ["src.png"] * 3,
                "item": [None] * 3,
                "image": [{"bytes": png_bytes(), "path": "src.png"}] * 3,
            }
        ).write_parquet(folder / f"image_editing-0000{part}.parquet")
    samples, refused = read(DatasetSection(path=folder), task="p2p")
    assert [s.data_id for s in samples] == [f"TA-C_TA-R_{i}" for i in range(1, 7)]
    assert not refused
    assert samples[0].source_bytes == png_bytes()
    assert samples[0].dimension_prompt == ("a", "b")


def test_json_source_images_come_from_image_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.png").write_bytes(png_bytes())
    records = [
        {
            "data_id": "TA-C_IQ-R_1",
            "prompt": "a cat",
            "dimension": ["TA-C", "IQ-R"],
            "img_id": "cat.png",
            "item": "cat",
        },
        {
            "data_id": "TA-C_IQ-R_2",
            "prompt": "a dog",
            "dimension": ["TA-C", "IQ-R"],
            "img_id": "dog.png",
            "item": "dog",
        },
        {"data_id": "TA-C_IQ-R_3", "prompt": "no image", "dimension": ["TA-C", "IQ-R"]},
        {
            "data_id": "TA-C_IQ-R_4",
            "prompt": "escape",
            "dimension": ["TA-C", "IQ-R"],
            "img_id": "../images/cat.png",
        },
    ]
    path = tmp_path / "s2p.json"
    path.write_text(json.dumps(records))
    samples, refused = read(DatasetSection(path=path, image_root=root), task="s2p")
    assert [s.data_id for s in samples] == ["TA-C_IQ-R_1"]
    assert samples[0].source_path == root / "cat.png"
    assert samples[0].item == "cat"
    reasons = [r.reason for r in refused]
    assert "not found" in reasons[0]
    assert "no source image" in reasons[1]
    assert "plain file name" in reasons[2]
    listed = {**records[0], "data_id": "TA-C_IQ-R_5", "item": ["cat"]}
    path.write_text(json.dumps([listed]))
    samples, refused = read(DatasetSection(path=path, image_root=root), task="s2p")
    assert not samples and refused[0].reason == "item must be text (the subject's name), got list"
    # No subject at all: the judge was told of "the subject", the generator of "".
    unnamed: list[dict[str, object]] = [
        {**records[0], "data_id": f"TA-C_IQ-R_{6 + n}", "item": i}
        for n, i in enumerate([None, "", "  "])
    ]
    unnamed.append({k: v for k, v in records[0].items() if k != "item"})
    unnamed[-1]["data_id"] = "TA-C_IQ-R_9"
    path.write_text(json.dumps(unnamed))
    samples, refused = read(DatasetSection(path=path, image_root=root), task="s2p")
    assert not samples
    assert [r.reason for r in refused] == [
        "missing or empty item: an s2p sample names its subject"
    ] * 4


@pytest.mark.parametrize(
    "edit",
    [
        {"prompt": "two cats"},
        {"item": "kitten"},
        {"img_id": "kitten.png"},
        {"dimension": ["TA-C", "IQ-O"]},
    ],
)
def test_a_sample_that_asks_something_else_than_when_judged_is_quarantined(
    tmp_path: Path, edit: dict[str, object]
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for name in ("cat.png", "kitten.png"):
        (root / name).write_bytes(png_bytes())
    record = {
        "data_id": "TA-C_IQ-R_1",
        "prompt": "a cat",
        "dimension": ["TA-C", "IQ-R"],
        "img_id": "cat.png",
        "item": "cat",
    }
    path = tmp_path / "s2p.json"
    path.write_text(json.dumps([record, {**record, "data_id": "TA-C_IQ-R_2"}]))
    section = DatasetSection(path=path, image_root=root)
    (sample, other), _ = read(section, task="s2p")
    judged = {sample.data_id: sample.digest, other.data_id: other.digest}
    assert list(DatasetSource(section, "s2p", judged=judged)) == [sample, other]

    path.write_text(json.dumps([{**record, **edit}, {**record, "data_id": "TA-C_IQ-R_2"}]))
    entries = list(DatasetSource(section, "s2p", judged=judged))
    assert isinstance(entries[0], QuarantinedRecord) and entries[1] == other
    assert entries[0].reason.startswith("data_id 'TA-C_IQ-R_1' changed since it was judged")
    # A copy with another prompt (as prompt rewriting makes) asks something else too.
    assert sample.model_copy(update={"prompt": "two cats"}).digest != sample.digest
    # Without a record of the earlier judgement, the edited sample is simply read.
    assert isinstance(next(iter(DatasetSource(section, "s2p"))), Sample)


def test_a_sample_quarantined_as_changed_since_judged_counts_toward_the_limit(
    tmp_path: Path,
) -> None:
    # limit = 3 judged 3 samples; 2 of them edited since were quarantined and 2 more read in
    # their place: 5 data_ids judged under limit = 3.
    path = tmp_path / "prompts.json"
    write_prompts(path, 6)
    section = DatasetSection(path=path, limit=3)
    judged = {s.data_id: s.digest for s in DatasetSource(section, "t2i") if isinstance(s, Sample)}
    assert len(judged) == 3
    records = json.loads(path.read_text())
    for record in records[:2]:
        record["prompt"] += " (edited)"
    path.write_text(json.dumps(records))
    source = DatasetSource(section, "t2i", judged=judged)
    entries = list(source)
    assert [type(e).__name__ for e in entries] == ["QuarantinedRecord"] * 2 + ["Sample"]
    assert {e.data_id for e in entries} == set(judged)
    assert source.limit_reached
    assert set(source.selected_samples()) == set(judged)  # as the readers of the run count


def test_a_pair_edited_since_a_judgement_without_digest_is_quarantined_in_its_place(
    tmp_path: Path,
) -> None:
    # Judgements older than sample digests record the pair alone: a record whose pair was
    # edited since is told by it (one whose prompt was cannot be), and keeps its place under
    # the limit, as the readers of the run count it.
    path = tmp_path / "prompts.json"
    write_prompts(path, 6)
    section = DatasetSection(path=path, limit=3)
    judged = {
        s.data_id: RecordedPair(s.pair)
        for s in DatasetSource(section, "t2i")
        if isinstance(s, Sample)
    }
    records = json.loads(path.read_text())
    records[0]["prompt"] += " (edited)"
    records[1]["dimension"][1] = "R-T"
    path.write_text(json.dumps(records))
    source = DatasetSource(section, "t2i", judged=judged)
    entries = list(source)
    assert [type(e).__name__ for e in entries] == ["Sample", "QuarantinedRecord", "Sample"]
    refused = entries[1]
    assert isinstance(refused, QuarantinedRecord) and refused.index == 1
    assert refused.data_id == records[1]["data_id"]
    assert "(its pair differs: IQ-A_TA-S when judged, IQ-A_R-T now)" in refused.reason
    assert {e.data_id for e in entries} == set(judged)
    samples = {e.data_id: e.dimensions for e in entries if isinstance(e, Sample)}
    assert source.selected_samples(refused={1}, judged=set(judged)) == samples


def test_digests_of_odd_text_and_of_t2i_image_ids(tmp_path: Path) -> None:
    """Text with control and invisible characters gets a digest (a lone surrogate is refused:
    see the quarantine test); a t2i sample's img_id, which nothing uses, is not part of it."""
    record = {
        "data_id": "IQ-R_IQ-O_1",
        "prompt": "a \x00 \u200b cat",
        "dimension": ("IQ-R", "IQ-O"),
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps([record]))
    (sample,), _ = read(DatasetSection(path=path))
    judged = {sample.data_id: sample.digest}
    assert list(DatasetSource(DatasetSection(path=path), "t2i", judged=judged)) == [sample]
    path.write_text(json.dumps([{**record, "img_id": "unused.png"}]))
    assert list(DatasetSource(DatasetSection(path=path), "t2i", judged=judged)) == [
        sample.model_copy(update={"img_id": "unused.png"})
    ]


def test_a_sample_whose_text_moved_across_a_unit_separator_is_quarantined(
    tmp_path: Path,
) -> None:
    # The digest joined the fields with "\x1f", which a field may hold: an edit moving text
    # from the prompt to the item across one kept the digest, and was judged as it was.
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.png").write_bytes(png_bytes())
    record = {
        "data_id": "TA-C_IQ-R_1",
        "prompt": "a cat\x1fTA-C_IQ-R\x1fred",
        "dimension": ["TA-C", "IQ-R"],
        "img_id": "cat.png",
        "item": "cat",
    }
    path = tmp_path / "s2p.json"
    path.write_text(json.dumps([record]))
    section = DatasetSection(path=path, image_root=root)
    (sample,), _ = read(section, task="s2p")
    judged = {sample.data_id: sample.digest}
    path.write_text(json.dumps([{**record, "prompt": "a cat", "item": "red\x1fTA-C_IQ-R\x1fcat"}]))
    (entry,) = DatasetSource(section, "s2p", judged=judged)
    assert isinstance(entry, QuarantinedRecord)
    assert entry.reason.startswith("data_id 'TA-C_IQ-R_1' changed since it was judged")
    # Text without one keeps the digest it had: the run directories judged so far hold it.
    assert sample_digest("s2p", "a cat", "TA-C_IQ-R", "cat", "cat.png") == "3eba007c5aea2baa"
    assert sample_digest("t2i", "a cat", "TA-C_IQ-R", None, "cat.png") == "c87cc9464d590f48"


def test_filters_and_limit(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "p.json", 40)
    by_pair, _ = read(DatasetSection(path=path, pairs=["TA-C_IQ-R"]))  # either order
    assert {s.pair for s in by_pair} == {"IQ-R_TA-C"} and len(by_pair) == 10
    by_dimension, _ = read(DatasetSection(path=path, dimensions=["IQ-A"]))
    assert {s.pair for s in by_dimension} == {"IQ-A_TA-S", "R-T_IQ-A"}
    source = DatasetSource(DatasetSection(path=path, dimensions=["IQ-A"]), "t2i")
    assert source.dimensions_to_judge(by_dimension[0].dimensions) == ("IQ-A",)
    limited, _ = read(DatasetSection(path=path, limit=7, pairs=["IQ-R_TA-C", "D-K_IQ-R"]))
    assert len(limited) == 7


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "no id"}, "missing data_id"),
        ({"data_id": "IQ-R_TA-C_1"}, "missing or empty prompt"),
        ({"data_id": "IQ-R_TA-C_1", "prompt": " \n"}, "missing or empty prompt"),
        ({"data_id": "IQ-R_TA-C_1", "prompt": ["a", "b"]}, "prompt must be text, got list"),
        ({"data_id": "IQ-R_TA-C_1", "prompt": "p", "dimension": ["IQ-R"]}, "two dimension codes"),
        ({"data_id": "IQ-R_IQ-R_1", "prompt": "p"}, "same dimension twice"),
        (
            {"data_id": "/etc/passwd", "prompt": "p", "dimension": ["IQ-R", "TA-C"]},
            "safe file name",
        ),
        (
            {"data_id": "a/b", "prompt": "p", "dimension": ["IQ-R", "TA-C"]},
            "safe file name (it names the image file): letters, digits, '.', '_' and '-' only",
        ),
        ({"data_id": "IQ-R_TA-C", "prompt": "p"}, "_<number>"),
        ("not a record", "entry 0 is a JSON string, not a record"),
        (None, "entry 0 is a JSON null, not a record"),
        ([1], "entry 0 is a JSON array, not a record"),
        (
            {"data_id": 7, "prompt": "p", "dimension": ["IQ-R", "TA-C"]},
            "data_id must be text, got int 7",
        ),
        # JSON's "\\ud83d" escapes decode to lone surrogates, which no request can carry.
        ({"data_id": "IQ-R_TA-C_1", "prompt": "a \ud83d"}, "prompt is not valid Unicode"),
        (
            {"data_id": "IQ-R_TA-C_1", "prompt": "p", "dimension_prompt": ["ok", "\udfff"]},
            "dimension_prompt[1] is not valid Unicode: a lone surrogate '\\udfff' at character 0",
        ),
        ({"data_id": "IQ-R_TA-C_\ud83d", "prompt": "p", "x": ["\ud83d"]}, "safe file name"),
        # "$" matched before a final newline: the id passed, beside the same id without it.
        ({"data_id": "IQ-R_TA-C_9\n", "prompt": "p"}, "safe file name"),
        ({"data_id": "IQ-R_TA-C_1", "prompt": "p", "dimension": 5}, "two dimension codes, got 5"),
        (
            {"data_id": "IQ-R_TA-C_1", "prompt": "p", "dimension": {"IQ-R": 1, "TA-C": 2}},
            "two dimension codes",
        ),
    ],
)
def test_malformed_records_are_quarantined(tmp_path: Path, record: object, reason: str) -> None:
    path = tmp_path / "bad.json"
    good = {"data_id": "IQ-R_TA-C_9", "prompt": "fine", "dimension": ["IQ-R", "TA-C"]}
    path.write_text(json.dumps([record, good]))
    samples, refused = read(DatasetSection(path=path))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_9"]
    assert len(refused) == 1 and reason in refused[0].reason
    assert refused[0].index == 0
    refused[0].model_dump_json()  # the quarantine file's line: text it cannot hold is escaped


def test_a_null_dimensions_beside_a_dimension_takes_the_dimension(tmp_path: Path) -> None:
    # A parquet with both columns has nulls in one where the other holds the pair.
    path = tmp_path / "both.json"
    record = {
        "data_id": "IQ-R_TA-C_1",
        "prompt": "p",
        "dimensions": None,
        "dimension": ["D-K", "R-B"],
    }
    path.write_text(json.dumps([record]))
    samples, _ = read(DatasetSection(path=path))
    assert samples[0].dimensions == ("D-K", "R-B")


def test_source_images_past_the_readers_limits_are_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes())
    # 196 million pixels in a few kilobytes: more than Pillow agrees to decode.
    Image.new("1", (14000, 14000)).save(root / "bomb.png", optimize=True)
    (root / "text.png").write_text("not an image")
    records = [
        {"data_id": f"IQ-R_TA-C_{n}", "prompt": "p", "img_id": name}
        for n, name in enumerate(["ok.png", "bomb.png", "text.png"], start=1)
    ]
    path = tmp_path / "p2p.json"
    path.write_text(json.dumps(records))
    samples, refused = read(DatasetSection(path=path, image_root=root), task="p2p")
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]
    assert "source image 'bomb.png' cannot be decoded: Image size" in refused[0].reason
    assert refused[1].reason == "source image 'text.png' is no image Pillow can read"


class _CountingFile(io.FileIO):
    """A file opened for reading that adds the byte count of each read to ``sizes``."""

    def __init__(self, path: Path, sizes: list[int]) -> None:
        super().__init__(path, "r")
        self._sizes = sizes

    def readinto(self, buffer: Any) -> int | None:
        count = super().readinto(buffer)
        self._sizes.append(count or 0)
        return count

    def readall(self) -> bytes:
        data = super().readall()
        self._sizes.append(len(data))
        return data


def spy_on_reads(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """The byte counts of the reads of the files named ``name`` opened through ``Path.open``."""
    sizes: list[int] = []
    opened = Path.open

    def counting(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if path.name == name and mode == "rb":
            return io.BufferedReader(_CountingFile(path, sizes))
        return opened(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting)
    return sizes


@pytest.mark.parametrize("picture", ["junk", "png"])
def test_a_source_file_is_read_no_further_than_its_check_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, picture: str
) -> None:
    # The file was read whole before Pillow looked at it: a 600 MB file that is no image took
    # 1.27 s and 665 MB to refuse (from its header before), and a picture's bytes were held
    # beside its pixels. Junk is refused from its first bytes; a PNG is read once by Pillow
    # and once, a piece at a time, for its pixel data.
    root = tmp_path / "images"
    root.mkdir()
    size = 4 * 2**20
    if picture == "junk":
        data = b"not an image " + bytes(size)
    else:
        noise = random.Random(0).randbytes(1024 * 1024 * 3)
        buffer = io.BytesIO()
        Image.frombytes("RGB", (1024, 1024), noise).save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
        assert len(data) > 2**20  # more than a piece of the pixel-data check
    (root / "picture.png").write_bytes(data)
    path = tmp_path / "p2p.json"
    path.write_text(
        json.dumps([{"data_id": "IQ-R_TA-C_1", "prompt": "p", "img_id": "picture.png"}])
    )
    sizes = spy_on_reads(monkeypatch, "picture.png")
    samples, refused = read(DatasetSection(path=path, image_root=root), task="p2p")
    if picture == "junk":
        assert [r.reason for r in refused] == [
            "source image 'picture.png' is no image Pillow can read"
        ]
        assert sum(sizes) < 2**16
    else:
        assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]
        assert max(sizes) <= 2**20  # never the whole file in one read
        assert sum(sizes) <= 2 * len(data) + 2**16


def noise_image(fmt: str, size: int = 64) -> bytes:
    pixels = bytes(range(256)) * (size * size * 3 // 256 + 1)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels[: size * size * 3]).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "GIF"])
@pytest.mark.parametrize("where", ["image_root", "embedded"])
def test_truncated_source_images_of_every_format_are_quarantined(
    tmp_path: Path, fmt: str, where: str
) -> None:
    # Pillow's verify() reads a PNG's chunks through, but only the header of a JPEG or a GIF:
    # one cut in half passed, and failed at every generation and every --retry-errors.
    whole = noise_image(fmt)
    pictures = {"IQ-R_TA-C_1": whole, "IQ-R_TA-C_2": whole[: len(whole) // 2]}
    if where == "embedded":
        path = tmp_path / "p2p.parquet"
        pl.DataFrame(
            {
                "data_id": list(pictures),
                "prompt": ["p"] * 2,
                "image": [{"bytes": data, "path": None} for data in pictures.values()],
            }
        ).write_parquet(path)
        section = DatasetSection(path=path)
    else:
        root = tmp_path / "images"
        root.mkdir()
        for data_id, data in pictures.items():
            (root / f"{data_id}.img").write_bytes(data)
        path = tmp_path / "p2p.json"
        path.write_text(
            json.dumps([{"data_id": d, "prompt": "p", "img_id": f"{d}.img"} for d in pictures])
        )
        section = DatasetSection(path=path, image_root=root)
    samples, refused = read(section, task="p2p")
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]
    assert [r.data_id for r in refused] == ["IQ-R_TA-C_2"]
    assert "cannot be decoded" in refused[0].reason


def png_with_half_its_rows(size: int = 32) -> bytes:
    """An RGB PNG whose zlib stream is complete but holds half the rows its header gives:
    Pillow's load() takes it (the rest black), the generator's decoding refuses it."""
    rows = b"".join(b"\x00" + bytes([n % 256]) * (size * 3) for n in range(size // 2))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(body, zlib.crc32(kind))
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("where", ["image_root", "embedded"])
def test_a_png_whose_data_holds_half_its_rows_is_quarantined(tmp_path: Path, where: str) -> None:
    # Pillow's load() accepted it, the missing rows black, so it passed as a sample: then every
    # generation failed on it as an error judgement, asked again by --retry-errors forever.
    short = png_with_half_its_rows()
    with Image.open(io.BytesIO(short)) as image:
        image.load()  # what the check relied on: no error
    pictures = {"IQ-R_TA-C_1": noise_image("PNG", 32), "IQ-R_TA-C_2": short}
    if where == "embedded":
        path = tmp_path / "p2p.parquet"
        pl.DataFrame(
            {
                "data_id": list(pictures),
                "prompt": ["p"] * 2,
                "image": [{"bytes": data, "path": None} for data in pictures.values()],
            }
        ).write_parquet(path)
        section = DatasetSection(path=path)
        what = "embedded source image"
    else:
        root = tmp_path / "images"
        root.mkdir()
        for data_id, data in pictures.items():
            (root / f"{data_id}.png").write_bytes(data)
        path = tmp_path / "p2p.json"
        path.write_text(
            json.dumps([{"data_id": d, "prompt": "p", "img_id": f"{d}.png"} for d in pictures])
        )
        section = DatasetSection(path=path, image_root=root)
        what = "source image 'IQ-R_TA-C_2.png'"
    samples, refused = read(section, task="p2p")
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]
    assert [(r.data_id, r.reason) for r in refused] == [
        (
            "IQ-R_TA-C_2",
            f"{what} is not a readable PNG: its image data inflates to 1552 bytes where its "
            "32x32 pixels need 3104 (its zlib stream ends there); replace the file",
        )
    ]


def test_source_images_under_8_pixels_on_a_side_are_quarantined(tmp_path: Path) -> None:
    # An editing model's VAE shrinks them to nothing: every call failed, and four of them
    # stopped the run as the generator's fault.
    sizes = {"IQ-R_TA-C_1": (8, 8), "IQ-R_TA-C_2": (1, 1), "IQ-R_TA-C_3": (64, 7)}
    path = tmp_path / "p2p.parquet"
    pictures = []
    for width, height in sizes.values():
        buffer = io.BytesIO()
        Image.new("RGB", (width, height)).save(buffer, format="PNG")
        pictures.append({"bytes": buffer.getvalue(), "path": None})
    pl.DataFrame({"data_id": list(sizes), "prompt": ["p"] * 3, "image": pictures}).write_parquet(
        path
    )
    samples, refused = read(DatasetSection(path=path), task="p2p")
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]
    reasons = {r.data_id: r.reason for r in refused}
    assert reasons["IQ-R_TA-C_2"] == (
        "embedded source image is 1x1 pixels: under 8 on a side, too small for an "
        "image-editing model"
    )
    assert "is 64x7 pixels" in reasons["IQ-R_TA-C_3"]


def test_a_source_image_field_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    # Quarantined as "no source image (no image, no img_id)", as if the field were absent.
    root = tmp_path / "images"
    root.mkdir()
    (root / "good.png").write_bytes(png_bytes())
    records = [
        {"data_id": "IQ-R_TA-C_1", "prompt": "p", "image": {"bytes": "text", "path": "good.png"}},
        {"data_id": "IQ-R_TA-C_2", "prompt": "p", "image": 12},
        {"data_id": "IQ-R_TA-C_3", "prompt": "p", "image": {"bytes": 5}},
        {"data_id": "IQ-R_TA-C_4", "prompt": "p"},
    ]
    path = tmp_path / "p2p.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    _, refused = read(DatasetSection(path=path, image_root=root), task="p2p")
    expected = "the picture's bytes, a {bytes, path} mapping or a path under [dataset] image_root"
    assert [r.reason for r in refused] == [
        "p2p sample has no source image: image.bytes is text, not the picture's bytes (or "
        "give an img_id)",
        f"p2p sample has no source image: image is int '12', where {expected} is expected "
        "(or give an img_id)",
        f"p2p sample has no source image: image.bytes is int '5', where {expected} is "
        "expected (or give an img_id)",
        "p2p sample has no source image (no image, no img_id)",
    ]


def test_an_image_with_empty_bytes_and_no_path_says_so(tmp_path: Path) -> None:
    # Quarantined as "no source image (no image, no img_id)", as if the column were absent.
    path = tmp_path / "p2p.parquet"
    pl.DataFrame(
        {
            "data_id": ["IQ-R_TA-C_1"],
            "prompt": ["p"],
            "image": [{"bytes": b"", "path": None}],
        }
    ).write_parquet(path)
    _, refused = read(DatasetSection(path=path), task="p2p")
    assert [r.reason for r in refused] == [
        "p2p sample has no source image: image.bytes is empty and image.path names no file "
        "(embed the picture's bytes, or give an img_id)"
    ]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_an_image_column_holding_a_path_is_looked_up_under_image_root(
    tmp_path: Path, fmt: str
) -> None:
    # Hugging Face's Image() not embedded ({"bytes": None, "path": ...}), or JSON Lines'
    # "image": "name.png": refused as having "no image, no img_id".
    root = tmp_path / "images"
    root.mkdir()
    (root / "good.png").write_bytes(png_bytes())
    if fmt == "parquet":
        path = tmp_path / "p2p.parquet"
        pl.DataFrame(
            {
                "data_id": ["IQ-R_TA-C_1", "IQ-R_TA-C_2"],
                "prompt": ["p"] * 2,
                "img_id": ["", None],
                "image": [{"bytes": None, "path": "good.png"}, {"bytes": b"", "path": "x.png"}],
            }
        ).write_parquet(path)
    else:
        path = tmp_path / "p2p.jsonl"
        records = [
            {"data_id": "IQ-R_TA-C_1", "prompt": "p", "image": "good.png"},
            {"data_id": "IQ-R_TA-C_2", "prompt": "p", "image": "x.png"},
        ]
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    section = DatasetSection(path=path, image_root=root)
    samples, refused = read(section, task="p2p")
    assert [(s.data_id, s.img_id, s.source_path) for s in samples] == [
        ("IQ-R_TA-C_1", "good.png", root / "good.png")
    ]
    assert [(r.data_id, r.reason) for r in refused] == [
        ("IQ-R_TA-C_2", f"source image 'x.png' not found in {root}")
    ]
    # What a resume compares: the name the sample was built with.
    judged = {samples[0].data_id: samples[0].digest}
    assert next(iter(DatasetSource(section, "p2p", judged=judged))) == samples[0]
    # Without image_root, the reason says what the column holds and what to set.
    _, refused = read(DatasetSection(path=path), task="p2p")
    assert refused[0].reason == (
        "the image column holds a path, 'good.png', not the picture's bytes: set [dataset] "
        "image_root to the folder it is in (the path is looked up there)"
    )


@pytest.mark.parametrize("image_root", [True, False])
def test_inline_image_text_is_named_and_quoted_short(tmp_path: Path, image_root: bool) -> None:
    # A data: URL or base64 in the image field was called "a path", with the advice to set
    # image_root, and quoted whole: a reason of 270,000 characters, stored twice.
    root = tmp_path / "images"
    root.mkdir()
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(buffer, "PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    assert len(encoded) > 4096  # past what a path can be: the record keeps its start
    jpeg = base64.b64encode(noise_image("JPEG", 64)).decode("ascii")
    long_name = "n" * 100 + ".png"
    records = [
        {"data_id": "IQ-R_TA-C_1", "prompt": "p", "image": f"data:image/png;base64,{encoded}"},
        {"data_id": "IQ-R_TA-C_2", "prompt": "p", "image": jpeg},
        {"data_id": "IQ-R_TA-C_3", "prompt": "p", "image": {"bytes": None, "path": encoded}},
        {"data_id": "IQ-R_TA-C_4", "prompt": "p", "img_id": f"data:image/png;base64,{encoded}"},
        {"data_id": "IQ-R_TA-C_5", "prompt": "p", "img_id": long_name},
    ]
    path = tmp_path / "p2p.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    section = DatasetSection(path=path, image_root=root if image_root else None)
    samples, refused = read(section, task="p2p")
    assert samples == []
    advice = (
        "not the picture's bytes or a file name: decode it into the picture's bytes in the "
        "dataset (image = {bytes, path}), or save it as a file under [dataset] image_root and "
        "name that file by img_id"
    )
    url = f"data:image/png;base64,{encoded}"
    cut = f"{encoded[:60]!r}... ({len(encoded)} characters)"
    assert [r.reason for r in refused[:4]] == [
        f"image holds a data: URL ({url[:60]!r}... ({len(url)} characters)), {advice}",
        f"image holds base64 text ({jpeg[:60]!r}... ({len(jpeg)} characters)), {advice}",
        f"image.path holds base64 text ({cut}), {advice}",
        f"img_id holds a data: URL ({url[:60]!r}... ({len(url)} characters)), {advice}",
    ]
    shown = f"{long_name[:60]!r}... (104 characters)"
    assert refused[4].reason == (
        f"source image {shown} not found in {root}"
        if image_root
        else f"img_id {shown} given but [dataset] image_root is not set"
    )
    # The record kept in quarantine.jsonl holds the start of the text and its length.
    assert refused[0].record["image"] == f"{url[:200]}... <{len(url)} characters, the rest omitted>"
    assert refused[2].record["image"] == {
        "bytes": None,
        "path": f"{encoded[:200]}... <{len(encoded)} characters, the rest omitted>",
    }
    assert refused[4].record["img_id"] == long_name  # a name that could be a path stays whole
    for entry in (refused[0], refused[2], refused[3]):
        assert len(json.dumps(entry.model_dump(mode="json"))) < 1000


def test_an_image_root_that_is_no_folder_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "p2p.json"
    path.write_text(json.dumps([{"data_id": "IQ-R_TA-C_1", "prompt": "p", "img_id": "a.png"}]))
    with pytest.raises(DatasetError, match=r"image_root .*nonexistent does not exist"):
        read(DatasetSection(path=path, image_root=tmp_path / "nonexistent"), task="p2p")
    with pytest.raises(DatasetError, match=r"image_root .*p2p.json is not a folder"):
        read(DatasetSection(path=path, image_root=path), task="p2p")


def test_a_dataset_or_image_root_that_cannot_be_looked_up_is_one_error(tmp_path: Path) -> None:
    # Not only a missing file: a name too long for the file system (or a folder on the way
    # that may not be entered, an I/O error) is an error that says so, not a traceback.
    too_long = tmp_path / ("x" * 300 + ".json")
    with pytest.raises(DatasetError, match="cannot be looked up: File name too long"):
        read(DatasetSection(path=too_long))
    path = write_prompts(tmp_path / "p.json", 1)
    with pytest.raises(DatasetError, match=r"image_root .* cannot be looked up: File name too"):
        read(DatasetSection(path=path, image_root=tmp_path / ("r" * 300)), task="p2p")


@pytest.mark.parametrize("name", ["pipe.json", "pipe.jsonl", "pipe.parquet", "folder"])
def test_a_named_pipe_for_a_dataset_is_refused_not_waited_on(tmp_path: Path, name: str) -> None:
    # Reading a pipe waits for a writer that never comes, in a thread no stop reaches.
    path = tmp_path / name
    if name == "folder":  # a pipe among a folder's shards is passed over
        path.mkdir()
        os.mkfifo(path / "part-0.parquet")
        pl.DataFrame({"data_id": ["IQ-R_TA-C_1"], "prompt": ["p"]}).write_parquet(
            path / "part-1.parquet"
        )
    else:
        os.mkfifo(path)
    outcome: list[object] = []

    def go() -> None:
        try:
            outcome.append(read(DatasetSection(path=path)))
        except DatasetError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=go, daemon=True)  # left behind only if the test fails
    thread.start()
    thread.join(timeout=60)  # a safety net: the refusal takes no time
    assert outcome, "the dataset reader waits on the pipe"
    [result] = outcome
    if name == "folder":
        assert isinstance(result, tuple) and [s.data_id for s in result[0]] == ["IQ-R_TA-C_1"]
    else:
        assert isinstance(result, DatasetError)
        assert f"dataset {path} is a named pipe (FIFO), not a file or a folder" in str(result)


def test_a_source_image_that_cannot_be_looked_up_is_its_record_s_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "locked.png").write_bytes(png_bytes())
    (root / "folder.png").mkdir()
    names = {"IQ-R_TA-C_1": "x" * 300 + ".png", "IQ-R_TA-C_2": "locked.png"}
    names |= {"IQ-R_TA-C_3": "folder.png", "IQ-R_TA-C_4": "x\0y.png"}
    records = [
        {"data_id": data_id, "prompt": "p", "img_id": img_id} for data_id, img_id in names.items()
    ]
    path = tmp_path / "p2p.json"
    path.write_text(json.dumps(records))
    stat = Path.stat

    def refusing_stat(self: Path, **kwargs: bool) -> object:
        if self.name == "locked.png":  # as a file of another user's would (tests run as root)
            raise PermissionError(13, "Permission denied", str(self))
        return stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", refusing_stat)
    samples, refused = read(DatasetSection(path=path, image_root=root), task="p2p")
    assert not samples
    reasons = {r.data_id: r.reason for r in refused}
    assert "cannot be looked up (File name too long)" in reasons["IQ-R_TA-C_1"]
    assert "cannot be looked up (Permission denied)" in reasons["IQ-R_TA-C_2"]
    assert "'folder.png' in " in reasons["IQ-R_TA-C_3"]
    assert reasons["IQ-R_TA-C_3"].endswith("is not a file")
    assert "not a plain file name" in reasons["IQ-R_TA-C_4"]


def test_json_past_the_readers_limits_is_a_clear_error_or_its_lines_fault(
    tmp_path: Path,
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(DatasetError, match="nested too deep to read"):
        read(DatasetSection(path=deep))
    big = tmp_path / "big.json"
    big.write_text('[{"data_id": "IQ-R_TA-C_1", "x": ' + "9" * 5000 + "}]")
    with pytest.raises(DatasetError, match="an integer too long to read"):
        read(DatasetSection(path=big))
    lines = tmp_path / "lines.jsonl"
    lines.write_text(
        '{"data_id": "IQ-R_TA-C_1", "prompt": "a"}\n'
        + "[" * 100_000
        + "]" * 100_000
        + '\n{"data_id": "IQ-R_TA-C_2", "x": '
        + "9" * 5000
        + "}\n"
    )
    samples, refused = read(DatasetSection(path=lines))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]
    assert [r.reason.split(":")[0] for r in refused] == ["line 2", "line 3"]


def test_a_json_object_is_read_as_records_by_data_id_or_refused(tmp_path: Path) -> None:
    # Some TRIG files map data_id -> record; one record alone, not in a list, read as such a
    # map gave no record at all, silently.
    record = {"data_id": "IQ-R_TA-C_1", "prompt": "a red bike", "dimension": ["IQ-R", "TA-C"]}
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps(record))
    with pytest.raises(DatasetError, match=r"values are no records: .*put it in \[ \]"):
        read(DatasetSection(path=alone))
    mapped = tmp_path / "mapped.json"
    mapped.write_text(json.dumps({"IQ-R_TA-C_1": record, "IQ-R_TA-C_2": 5}))
    samples, refused = read(DatasetSection(path=mapped))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]
    assert [r.reason for r in refused] == ["'IQ-R_TA-C_2' maps to a JSON number, not a record"]
    assert refused[0].record == {"value": "5", "data_id": "IQ-R_TA-C_2"}
    assert refused[0].data_id == "IQ-R_TA-C_2"  # was null, though the key names it
    scalar = tmp_path / "scalar.json"
    scalar.write_text("7")
    with pytest.raises(DatasetError, match="expected a JSON list of TRIG records, not a JSON"):
        read(DatasetSection(path=scalar))


def test_a_json_object_naming_a_key_twice_keeps_the_first_and_quarantines_the_second(
    tmp_path: Path,
) -> None:
    # Python's json keeps the last of two values of a key, without a word; and a record's own
    # data_id took over its key, so the record that really had that id was refused.
    path = tmp_path / "p.json"
    path.write_text(
        '{"IQ-R_TA-C_1": {"prompt": "first"}, "IQ-R_TA-C_1": {"prompt": "second"}, '
        '"IQ-R_TA-C_2": {"data_id": "IQ-R_TA-C_3", "prompt": "inner id"}, '
        '"IQ-R_TA-C_3": {"prompt": "third"}, '
        '"IQ-R_TA-C_4": {"data_id": "IQ-R_TA-C_4", "prompt": "agrees", "x": {"a": 1, "a": 2}}}'
    )
    source = DatasetSource(DatasetSection(path=path), "t2i")
    samples: list[Sample] = []
    refused: list[QuarantinedRecord] = []
    for entry in source:
        if isinstance(entry, QuarantinedRecord):
            refused.append(entry)
        else:
            samples.append(entry)
    assert [(s.data_id, s.prompt) for s in samples] == [
        ("IQ-R_TA-C_1", "first"),
        ("IQ-R_TA-C_3", "third"),
        ("IQ-R_TA-C_4", "agrees"),
    ]
    assert source.records_read == 5
    assert [(r.index, r.data_id) for r in refused] == [(1, "IQ-R_TA-C_1"), (2, "IQ-R_TA-C_3")]
    assert refused[0].reason == "duplicate data_id 'IQ-R_TA-C_1'"
    assert refused[0].record["prompt"] == "second"
    assert refused[1].reason.startswith(
        "key 'IQ-R_TA-C_2' maps to a record whose data_id is 'IQ-R_TA-C_3'"
    )
    assert refused[1].record == {"data_id": "IQ-R_TA-C_3", "prompt": "inner id"}


def test_a_damaged_shard_of_a_parquet_folder_is_named(tmp_path: Path) -> None:
    # The error named only the folder: which of its (40, for TRIG's p2p) files to fetch again?
    folder = tmp_path / "shards"
    folder.mkdir()
    for part in range(3):
        pl.DataFrame({"data_id": [f"IQ-R_TA-C_{part}"], "prompt": ["p"]}).write_parquet(
            folder / f"part-{part}.parquet"
        )
    cut = folder / "part-1.parquet"
    cut.write_bytes(cut.read_bytes()[:-20])
    with pytest.raises(DatasetError) as caught:
        read(DatasetSection(path=folder))
    assert str(caught.value).startswith(f"cannot read parquet dataset {folder}: ")
    assert f"(in {cut}: its footer cannot be read; it is damaged or cut short)" in str(caught.value)


def test_parquet_shards_in_linked_folders_are_read_once(tmp_path: Path) -> None:
    # A shard in a linked subfolder was skipped, unsaid (Path.rglob on Python 3.11 does not
    # follow linked folders); with every shard behind links, the folder "held no files".
    def shard(folder: Path, part: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        frame = pl.DataFrame({"data_id": [f"IQ-R_TA-C_{part}"], "prompt": ["p"]})
        frame.write_parquet(folder / f"part-{part}.parquet")

    shard(tmp_path / "top", 0)
    shard(tmp_path / "real", 1)
    (tmp_path / "top" / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "top" / "loop").symlink_to(tmp_path / "top")  # walked once, not forever
    (tmp_path / "top" / "again").symlink_to(tmp_path / "real")  # one folder, read once
    samples, _ = read(DatasetSection(path=tmp_path / "top"))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1", "IQ-R_TA-C_0"]
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "linked").symlink_to(tmp_path / "real")
    samples, _ = read(DatasetSection(path=tmp_path / "only"))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]


PQ_CONFIG = """\
[run]
name = "r"
[dataset]
path = "."
[[generators]]
name = "a"
backend = "synthetic"
[[judges]]
backend = "fake"
"""


def write_parquet_prompts(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = json.loads(write_prompts(folder / "p.json", count, key="dimensions").read_text())
    (folder / "p.json").unlink()
    columns = ("data_id", "prompt", "dimensions", "dimension_prompt", "parent_dataset")
    path = folder / "train-00000.parquet"
    pl.DataFrame([{c: r[c] for c in columns} for r in records]).write_parquet(path)
    return path


def test_a_run_directory_inside_its_parquet_dataset_folder_is_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run's report (runs/r/report/a/judgements.parquet) was read as a shard of the
    # dataset: every later run, and validate, failed (exit 4) on polars' schema check.
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_OK

    folder = tmp_path / "pq"
    write_parquet_prompts(folder, 6)
    config = folder / "config.toml"
    config.write_text(PQ_CONFIG)
    assert main(["run", str(config), "--headless"]) == EXIT_OK
    assert "done: 12 judgements" in capsys.readouterr().err
    report = folder / "runs" / "r" / "report" / "a" / "judgements.parquet"
    assert report.is_file()
    note = (
        f"dataset folder {folder}: left out 1 parquet file(s) in 1 trig-stream run "
        "directory inside it (runs/r): a run's reports are no dataset records"
    )
    assert main(["validate", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "6 records, 0 samples to judge, 6 already judged in the run directory" in out
    assert f"note: {note}" in out
    assert main(["run", str(config), "--headless"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "done: 0 judgements" in err  # the same samples, none judged again
    assert f"note: {note}" in err
    assert err.count("left out 1 parquet file(s)") == 1
    assert pl.read_parquet(report).height == 12


def test_a_run_directory_that_is_its_own_parquet_dataset_folder_runs_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only run directories below the dataset folder were left out: a run whose run directory
    # was the folder itself read its report/a/judgements.parquet as a shard on its next
    # start, and validate and run failed (exit 4) on every later try.
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_OK

    folder = tmp_path / "out" / "self"
    write_parquet_prompts(folder, 4)
    config = tmp_path / "config.toml"
    run = f'name = "self"\noutput_dir = "{folder.parent}"'
    config.write_text(
        PQ_CONFIG.replace('name = "r"', run).replace('path = "."', f'path = "{folder}"')
    )
    assert main(["validate", str(config)]) == EXIT_OK
    assert main(["run", str(config), "--headless"]) == EXIT_OK
    assert "done: 8 judgements" in capsys.readouterr().err
    report = folder / "report" / "a" / "judgements.parquet"
    assert report.is_file()
    note = (
        f"dataset folder {folder} is itself a trig-stream run directory: left out 1 "
        "parquet file(s) its report wrote (report/<model>/judgements.parquet): a run's "
        "reports are no dataset records"
    )
    assert main(["validate", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "4 records, 0 samples to judge, 4 already judged in the run directory" in out
    assert f"note: {note}" in out
    assert main(["run", str(config), "--headless"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "done: 0 judgements" in err
    assert f"note: {note}" in err
    # The dataset's own shards beside the run's files are still read, and a run directory
    # below it is still named on its own.
    nested = folder / "more" / "r"
    (nested / "report").mkdir(parents=True)
    (nested / "journal.jsonl").write_text('{"schema_version":1,"model":"g"}\n')
    pl.DataFrame({"score": [0.5]}).write_parquet(nested / "report" / "j.parquet")
    source = DatasetSource(DatasetSection(path=folder), normalise_task("t2i"))
    assert len([entry for entry in source if isinstance(entry, Sample)]) == 4
    assert source.notes == [
        f"{note}; dataset folder {folder}: left out 1 parquet file(s) in 1 trig-stream run "
        "directory inside it (more/r): a run's reports are no dataset records"
    ]


def test_a_parquet_dataset_in_a_report_folder_of_its_own_run_directory_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every parquet file under report/ and images/ of a dataset folder that is its own run
    # directory was left out, the dataset's own shards there too: its first run writes the
    # manifest and journal before reading the dataset, then found no shard (exit 4).
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_OK

    folder = tmp_path / "out" / "self"
    shard = write_parquet_prompts(folder / "report", 4)
    config = tmp_path / "config.toml"
    run = f'name = "self"\noutput_dir = "{folder.parent}"'
    config.write_text(
        PQ_CONFIG.replace('name = "r"', run).replace('path = "."', f'path = "{folder}"')
    )
    assert main(["run", str(config), "--headless"]) == EXIT_OK
    assert "done: 8 judgements" in capsys.readouterr().err
    assert (folder / "report" / "a" / "judgements.parquet").is_file()
    # A shard in a folder named like a model's beside it is the dataset's too.
    (folder / "report" / "b").mkdir()
    shard.rename(folder / "report" / "b" / "train.parquet")
    source = DatasetSource(DatasetSection(path=folder), normalise_task("t2i"))
    assert len([entry for entry in source if isinstance(entry, Sample)]) == 4
    assert main(["run", str(config), "--headless"]) == EXIT_OK
    assert "done: 0 judgements" in capsys.readouterr().err


def test_prompts_of_a_folder_holding_a_run_directory_leave_it_out(tmp_path: Path) -> None:
    from trig_stream.analysis.inputs import read_prompt_pairs

    folder = tmp_path / "pq"
    write_parquet_prompts(folder, 4)
    run_dir = folder / "out" / "r"
    (run_dir / "report" / "a").mkdir(parents=True)
    # A run directory whose manifest is gone: its journal is trig-stream's.
    (run_dir / "journal.jsonl").write_text('{"schema_version":1,"model":"g"}\n')
    pl.DataFrame({"score": [0.5]}).write_parquet(run_dir / "report" / "a" / "j.parquet")
    given = read_prompt_pairs(folder)
    assert len(given.pairs) == 4 and not given.skipped
    assert given.notes == (
        f"dataset folder {folder}: left out 1 parquet file(s) in 1 trig-stream run "
        "directory inside it (out/r): a run's reports are no dataset records",
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("manifest.json", '{"files": ["part-1.parquet"], "version": 1}'),
        ("manifest.json", "not json"),
        ("manifest.json", ""),  # empty: nothing to tell it by
        ("journal.jsonl", '{"event": "exported", "rows": 5}\n'),
        ("journal.jsonl", ""),
    ],
)
def test_a_subfolder_with_another_tool_s_manifest_or_journal_is_read(
    tmp_path: Path, name: str, content: str
) -> None:
    # Any manifest.json or journal.jsonl made a subfolder a "trig-stream run directory": its
    # shards were left out (5 of 10 samples), with a note calling it a run directory.
    folder = tmp_path / "ds"
    records = json.loads(write_prompts(tmp_path / "p.json", 10, key="dimensions").read_text())
    columns = ("data_id", "prompt", "dimensions", "dimension_prompt", "parent_dataset")
    rows = [{c: r[c] for c in columns} for r in records]
    (folder / "more").mkdir(parents=True)
    pl.DataFrame(rows[:5]).write_parquet(folder / "part-0.parquet")
    pl.DataFrame(rows[5:]).write_parquet(folder / "more" / "part-1.parquet")
    (folder / "more" / name).write_text(content)
    source = DatasetSource(DatasetSection(path=folder), normalise_task("t2i"))
    samples = [entry for entry in source if isinstance(entry, Sample)]
    assert len(samples) == 10
    assert source.notes == []


def test_a_large_manifest_of_another_tool_is_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dataset's own 100 MiB manifest.json (a JSON array, its index) was read and parsed
    # whole on every walk of the folder: seconds and hundreds of megabytes each time.
    import trig_stream.dataset_formats
    from trig_stream.manifest import MANIFEST_HEAD_BYTES

    folder = tmp_path / "ds"
    write_parquet_prompts(folder, 4)
    expected = len(read(DatasetSection(path=folder))[0])
    (folder / "index").mkdir()
    index = [{"file": f"train-{i:05}.parquet", "rows": i} for i in range(100_000)]
    (folder / "index" / "manifest.json").write_text(json.dumps(index))
    assert (folder / "index" / "manifest.json").stat().st_size > 2**20
    sizes = count_reads(monkeypatch, trig_stream.dataset_formats, "manifest.json")
    assert len(read(DatasetSection(path=folder))[0]) == expected
    assert sizes and sum(sizes) <= MANIFEST_HEAD_BYTES


@pytest.mark.parametrize("indent", [None, 2])
def test_a_run_directory_s_manifest_compact_or_indented_leaves_it_out(
    tmp_path: Path, indent: int | None
) -> None:
    from trig_stream.manifest import Manifest

    folder = tmp_path / "pq"
    write_parquet_prompts(folder, 4)
    expected = len(read(DatasetSection(path=folder))[0])
    run_dir = folder / "out" / "r"
    (run_dir / "report" / "a").mkdir(parents=True)
    manifest = Manifest(run_name="r", task="t2i").model_dump_json(indent=indent)
    (run_dir / "manifest.json").write_text(manifest)
    pl.DataFrame({"score": [0.5]}).write_parquet(run_dir / "report" / "a" / "j.parquet")
    source = DatasetSource(DatasetSection(path=folder), normalise_task("t2i"))
    assert len([entry for entry in source if isinstance(entry, Sample)]) == expected
    assert "left out 1 parquet file(s) in 1 trig-stream run directory" in source.notes[0]


def test_a_shard_that_does_not_fit_the_folder_s_columns_is_named(tmp_path: Path) -> None:
    # Polars' message named the file after a hint of its own scan options, which a config
    # cannot set.
    folder = tmp_path / "shards"
    write_parquet_prompts(folder, 2)
    other = folder / "zz" / "scores.parquet"
    other.parent.mkdir()
    pl.DataFrame({"data_id": ["IQ-R_TA-C_1"], "score": [0.5]}).write_parquet(other)
    with pytest.raises(DatasetError) as caught:
        read(DatasetSection(path=folder))
    assert str(caught.value) == (
        f"cannot read parquet dataset {folder}: its parquet files are read as the shards of "
        f"one dataset, and {other} does not fit the first one, {folder / 'train-00000.parquet'} "
        "(it has column(s) score that the first lacks; it lacks column(s) prompt, dimensions, "
        "dimension_prompt, parent_dataset); move the file that is no shard of the dataset out "
        "of the folder, or point [dataset] path at one file"
    )


def test_unreadable_datasets_raise_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read(DatasetSection(path=tmp_path / "absent.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DatasetError, match="cannot read"):
        read(DatasetSection(path=broken))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"no \.parquet"):
        read(DatasetSection(path=empty))


def test_a_json_dataset_in_any_unicode_encoding_reads_and_other_bytes_are_refused(
    tmp_path: Path,
) -> None:
    record = {"data_id": "IQ-R_TA-C_1", "prompt": "café crème", "dimension": ["IQ-R", "TA-C"]}
    for encoding in ("utf-8-sig", "utf-16", "utf-32"):
        path = tmp_path / f"{encoding}.json"
        path.write_text(json.dumps([record], ensure_ascii=False), encoding=encoding)
        samples, refused = read(DatasetSection(path=path))
        assert [s.prompt for s in samples] == ["café crème"] and not refused, encoding
    latin = tmp_path / "latin-1.json"
    latin.write_bytes(json.dumps([record], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin-1\.json: byte \d+ is not utf-8 text"):
        read(DatasetSection(path=latin))
    # Counted from the file's start: after a byte order mark it was 3 too low, the mark's.
    marked = tmp_path / "marked.json"
    marked.write_bytes(b'\xef\xbb\xbf[{"data_id": "IQ-R_TA-C_\xe9"}]')
    with pytest.raises(DatasetError, match=r"marked\.json: byte 27 is not utf-8 text"):
        read(DatasetSection(path=marked))


def test_json_lines_are_read_a_line_at_a_time_and_a_bad_line_is_its_record_s_fault(
    tmp_path: Path,
) -> None:
    records = [
        {"data_id": f"IQ-R_TA-C_{i}", "prompt": f"p{i}", "dimension": ["IQ-R", "TA-C"]}
        for i in range(1, 5)
    ]
    lines = [json.dumps(r).encode() for r in records]
    lines[1] = b'{"data_id": "IQ-R_TA-C_2", "prompt": '  # cut short
    lines[2] = b"[1, 2]"
    lines.insert(3, b"   ")  # blank: skipped
    lines.append(b'{"data_id": "IQ-R_TA-C_\xff"}')
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    section = DatasetSection(path=path)
    samples, refused = read(section)
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1", "IQ-R_TA-C_4"]
    reasons = [r.reason for r in refused]
    assert reasons[0].startswith("line 2 is not JSON: Expecting value")
    assert reasons[1] == "line 3 is a JSON array, not a record"
    assert reasons[2] == "line 6: byte 23 is not utf-8 text"
    assert refused[1].record == {"line": "[1, 2]"}
    assert DatasetSource(section, "t2i").count() == 2
    as_json = tmp_path / "prompts.json"  # the same lines under the name of a JSON file
    as_json.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(DatasetError, match=r'Extra data.*name it \.jsonl or set format = "jsonl"'):
        read(DatasetSection(path=as_json))
    assert len(read(DatasetSection(path=as_json, format="jsonl"))[0]) == 4
    # Counted from the line's start: after a byte order mark it was 3 too low, the mark's.
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b'\xef\xbb\xbf{"data_id": "IQ-R_TA-C_\xe9"}\n')
    assert [r.reason for r in read(DatasetSection(path=marked))[1]] == [
        "line 1: byte 26 is not utf-8 text"
    ]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_json_lines_in_utf_16_or_32_are_one_error(tmp_path: Path, encoding: str) -> None:
    # Split at newline bytes, every line was quarantined as not UTF-8, for no fault of its own.
    text = "".join(json.dumps({"data_id": f"IQ-R_TA-C_{i}", "prompt": "p"}) + "\n" for i in (1, 2))
    path = tmp_path / "prompts.jsonl"
    bom = "\ufeff" if encoding.endswith("-be") else ""  # the codecs without -be write one
    path.write_bytes((bom + text).encode(encoding))
    width = encoding.split("-")[1]
    with pytest.raises(DatasetError, match=f"is UTF-{width} text .*iconv -f UTF-{width} -t UTF-8"):
        read(DatasetSection(path=path))


def test_finished_samples_count_towards_the_limit_but_are_not_built(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "p.json", 12)
    asked: list[tuple[str, tuple[str, ...]]] = []

    def finished(data_id: str, dimensions: tuple[str, ...]) -> bool:
        asked.append((data_id, dimensions))
        return data_id.endswith("_1")

    section = DatasetSection(path=path, limit=6, dimensions=["IQ-R", "IQ-A"])
    source = DatasetSource(section, "t2i", finished=finished)
    samples = [s for s in source if isinstance(s, Sample)]
    # Every pair holds IQ-R or IQ-A. The four "_1" samples are finished and count towards
    # the limit of six, so only two are built.
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_2", "IQ-A_TA-S_2"]
    assert ("IQ-R_TA-C_1", ("IQ-R",)) in asked
    assert ("R-T_IQ-A_1", ("IQ-A",)) in asked


def test_count_reads_identity_columns_and_applies_filters(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "p.json", 40)
    assert DatasetSource(DatasetSection(path=path), "t2i").count() == 40
    section = DatasetSection(path=path, pairs=["TA-C_IQ-R"], limit=7)
    assert DatasetSource(section, "t2i").count() == 7
    parquet = tmp_path / "p.parquet"
    pl.DataFrame(
        {
            "data_id": ["IQ-R_TA-C_1", "IQ-R_TA-C_1", "../bad", "R-T_IQ-A_1"],
            "prompt": ["a", "b", "c", "d"],
            "dimensions": [["IQ-R", "TA-C"]] * 3 + [["R-T", "IQ-A"]],
            "image": [{"bytes": png_bytes(), "path": "x"}] * 4,
        }
    ).write_parquet(parquet)
    # The bad id is not counted; the duplicate is (no set of ids is kept for a count).
    assert DatasetSource(DatasetSection(path=parquet), "p2p").count() == 3


def test_source_images_are_not_needed_when_no_generator_of_the_run_reads_them(
    tmp_path: Path,
) -> None:
    # Judging images already made (an image folder) sends the judge those images alone: a
    # dataset naming sources that are nowhere, with no image_root, is judged all the same.
    record = {"data_id": "TA-C_IQ-R_1", "prompt": "edit", "dimension": ["TA-C", "IQ-R"]}
    path = tmp_path / "p2p.json"
    path.write_text(json.dumps([{**record, "img_id": "cat.png"}]))
    unread = DatasetSection(path=path, image_root=tmp_path / "nowhere")
    (sample,) = DatasetSource(unread, "p2p", source_images=False)
    assert isinstance(sample, Sample)
    assert (sample.img_id, sample.source_path, sample.source_bytes) == ("cat.png", None, None)
    with pytest.raises(DatasetError, match="image_root"):  # a reader of them needs the folder
        list(DatasetSource(unread, "p2p"))
    (refused,) = DatasetSource(DatasetSection(path=path), "p2p")
    assert isinstance(refused, QuarantinedRecord) and "image_root is not set" in refused.reason
    # The digest covers the img_id, not the image: a run directory judged with the sources
    # read resumes without them (and back) without a sample taken for edited.
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.png").write_bytes(png_bytes())
    (read_too,) = DatasetSource(DatasetSection(path=path, image_root=root), "p2p")
    assert isinstance(read_too, Sample) and read_too.source_path == root / "cat.png"
    assert sample.digest == read_too.digest
    judged = {sample.data_id: read_too.digest}
    (resumed,) = DatasetSource(DatasetSection(path=path), "p2p", judged=judged, source_images=False)
    assert isinstance(resumed, Sample)


def test_a_large_source_picture_is_read_without_pillows_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between Pillow's pixel limit and twice it, Pillow decodes a picture but prints its raw
    # DecompressionBombWarning (and the `warnings.warn(` line) on stderr: once when the
    # dataset checked the source, once when the generator read it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600 pixels: a warning
    root = tmp_path / "images"
    root.mkdir()
    Image.new("L", (40, 40), 128).save(root / "big.png")
    record = {"data_id": "IQ-R_TA-C_1", "prompt": "p", "dimension": ["IQ-R", "TA-C"]}
    path = tmp_path / "p2p.jsonl"
    path.write_text(json.dumps({**record, "img_id": "big.png"}) + "\n")
    # Recorded as Python shows them by default (a "simplefilter('always')" is the caller's
    # wish to see every warning, the engine's filters included).
    with warnings.catch_warnings(record=True) as caught:
        samples, refused = read(DatasetSection(path=path, image_root=root), task="p2p")
        assert not refused and len(samples) == 1
        assert source_image(samples[0]).size == (40, 40)
        embedded = io.BytesIO()
        Image.new("L", (40, 40)).save(embedded, format="PNG")
        sample = samples[0].model_copy(
            update={"source_path": None, "source_bytes": embedded.getvalue()}
        )
        assert source_image(sample).size == (40, 40)
    assert [w.message for w in caught] == []
    # Past twice the limit it is still refused, and says why.
    Image.new("L", (50, 50)).save(root / "big.png")
    samples, refused = read(DatasetSection(path=path, image_root=root), task="p2p")
    assert not samples and "could be decompression bomb" in refused[0].reason


@pytest.mark.parametrize("form", ["list", "object"])
def test_a_repeated_data_id_is_a_duplicate_also_when_its_first_record_is_refused(
    tmp_path: Path, form: str
) -> None:
    # The first record keeps its data_id even when refused for its content: the second was
    # judged under it (another pair), and a resume then called the first "changed since".
    path = tmp_path / "p.json"
    if form == "list":
        path.write_text(
            json.dumps(
                [
                    {"data_id": "IQ-R_TA-C_1", "prompt": "", "dimension": ["IQ-R", "TA-C"]},
                    {"data_id": "IQ-R_TA-C_1", "prompt": "a bike", "dimension": ["R-T", "R-B"]},
                    {"data_id": "IQ-R_TA-C_2", "prompt": "a cat", "dimension": ["IQ-R", "TA-C"]},
                ]
            )
        )
    else:
        path.write_text(
            '{"IQ-R_TA-C_1": {"prompt": ""}, "IQ-R_TA-C_1": {"prompt": "a dog"}, '
            '"IQ-R_TA-C_2": {"prompt": "a cat"}}'
        )
    section = DatasetSection(path=path)
    samples, refused = read(section)
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_2"]
    assert [(r.index, r.reason) for r in refused] == [
        (0, "missing or empty prompt"),
        (1, "duplicate data_id 'IQ-R_TA-C_1'"),
    ]
    # A resume reads the same: nothing is called changed since it was judged.
    judged = {s.data_id: s.digest for s in samples}
    again = list(DatasetSource(section, "t2i", judged=judged))
    assert [r.reason for r in again if isinstance(r, QuarantinedRecord)] == [
        "missing or empty prompt",
        "duplicate data_id 'IQ-R_TA-C_1'",
    ]


@pytest.mark.parametrize("form", ["list", "object"])
def test_a_repeated_data_id_is_a_duplicate_also_when_its_first_record_is_refused_for_its_pair(
    tmp_path: Path, form: str
) -> None:
    # The first record's identity was checked before its data_id was taken: one refused for
    # its pair, or a JSON object's entry that is no record, left its id to the next record,
    # which was judged in its place.
    path = tmp_path / "p.json"
    if form == "list":
        path.write_text(
            json.dumps(
                [
                    {"data_id": "IQ-R_TA-C_1", "prompt": "a", "dimension": ["IQ-R", "XX"]},
                    {"data_id": "IQ-R_TA-C_1", "prompt": "b"},
                    {"data_id": "IQ-R_TA-C_2", "prompt": "c"},
                ]
            )
        )
        first = "unknown dimension 'XX' in pair 'IQ-R_XX'"
    else:
        path.write_text(
            '{"IQ-R_TA-C_1": "not a record", "IQ-R_TA-C_1": {"prompt": "b"}, '
            '"IQ-R_TA-C_2": {"prompt": "c"}}'
        )
        first = "'IQ-R_TA-C_1' maps to a JSON string, not a record"
    source = DatasetSource(DatasetSection(path=path), "t2i")
    samples, refused = read(source.section)
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_2"]
    assert [(r.index, r.reason) for r in refused] == [
        (0, first),
        (1, "duplicate data_id 'IQ-R_TA-C_1'"),
    ]
    # Those that read the run (validate, status, watch, analyze) select the same.
    assert source.selected_samples(refused={0, 1}) == {"IQ-R_TA-C_2": ("IQ-R", "TA-C")}
    assert source.selected_samples() == {"IQ-R_TA-C_2": ("IQ-R", "TA-C")}
    pairs, skipped = source.pairs_by_data_id()
    assert pairs == {"IQ-R_TA-C_2": ("IQ-R", "TA-C")}
    assert skipped[1] == "record 1 (data_id 'IQ-R_TA-C_1'): duplicate data_id 'IQ-R_TA-C_1'"


def test_data_ids_that_differ_only_in_case_are_duplicates(tmp_path: Path) -> None:
    # An image is named after its data_id: on a file system that ignores case (macOS's,
    # exFAT) "cat_1.png" overwrote "Cat_1.png", whose judgements then scored another picture.
    path = tmp_path / "p.jsonl"
    records = [
        {"data_id": "Cat_1", "prompt": "a cat", "dimensions": ["IQ-R", "TA-C"]},
        {"data_id": "cat_1", "prompt": "a dog", "dimensions": ["IQ-R", "TA-C"]},
        {"data_id": "CAT_1", "prompt": "an owl", "dimensions": ["R-T", "IQ-A"]},
        {"data_id": "cat_2", "prompt": "a cow", "dimensions": ["IQ-R", "TA-C"]},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    source = DatasetSource(DatasetSection(path=path), "t2i")
    samples, refused = read(source.section)
    assert [s.data_id for s in samples] == ["Cat_1", "cat_2"]
    assert [(r.index, r.reason) for r in refused] == [
        (1, "duplicate data_id 'cat_1': differs only in case from 'Cat_1'"),
        (2, "duplicate data_id 'CAT_1': differs only in case from 'Cat_1'"),
    ]
    # Those that read the run (validate, status, watch, report) select the same.
    expected = {"Cat_1": ("IQ-R", "TA-C"), "cat_2": ("IQ-R", "TA-C")}
    assert source.selected_samples(refused={1, 2}) == expected
    assert source.selected_samples() == expected
    # analyze --prompts writes no image file per data_id: each spelling has its pair.
    pairs, skipped = source.pairs_by_data_id()
    assert pairs == {**expected, "cat_1": ("IQ-R", "TA-C"), "CAT_1": ("R-T", "IQ-A")}
    assert not skipped
    # A run directory an earlier version judged both in resumes with the first.
    judged = {"Cat_1": samples[0].digest, "cat_1": "judged before", "cat_2": samples[1].digest}
    again = list(DatasetSource(source.section, "t2i", judged=judged))
    assert again == [samples[0], refused[0], refused[1], samples[1]]


@pytest.mark.parametrize("limit", [2, 3])
def test_a_case_duplicate_an_earlier_version_judged_counts_toward_the_limit(
    tmp_path: Path, limit: int
) -> None:
    # An earlier version judged both "Cat_1" and "cat_1" under the limit; refused now as a
    # duplicate, "cat_1" still took its place there, as a sample judged and since changed
    # does: a resume judged "cat_2", a sample past the limit, too.
    path = tmp_path / "p.jsonl"
    ids = ["Cat_1", "cat_1", "cat_1", "cat_2", "cat_3"]
    pair = ("IQ-R", "TA-C")
    records = [{"data_id": i, "prompt": "p", "dimensions": pair} for i in ids]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    section = DatasetSection(path=path, limit=limit)
    (first, *_), _ = read(section)
    judged = {"Cat_1": first.digest, "cat_1": "judged before"}
    source = DatasetSource(section, "t2i", judged=judged)
    entries = list(source)
    # The same spelling again is a duplicate the earlier version refused too: not counted.
    samples = [e.data_id for e in entries if isinstance(e, Sample)]
    assert samples == ["Cat_1", "cat_2"][: limit - 1]
    assert source.limit_reached
    refused = {e.index for e in entries if isinstance(e, QuarantinedRecord)}
    expected = {data_id: pair for data_id in samples}
    assert source.selected_samples(refused=refused, judged=judged) == expected
    identities = source.sample_identities(at_least=limit + len(refused))
    assert identities.selected(limit, refused=refused, judged=judged) == expected
    # Never judged, it leaves its place to the next record.
    fresh = DatasetSource(section, "t2i", judged={"Cat_1": first.digest})
    kept = ["Cat_1", "cat_2", "cat_3"][:limit]
    assert [e.data_id for e in fresh if isinstance(e, Sample)] == kept
    assert source.selected_samples(refused=refused, judged={"Cat_1"}) == dict.fromkeys(kept, pair)


def test_a_judged_sample_refused_on_resume_for_its_source_image_counts_toward_the_limit(
    tmp_path: Path,
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for name in ("a.png", "b.png"):
        (root / name).write_bytes(png_bytes())
    path = tmp_path / "p2p.json"
    path.write_text(
        json.dumps(
            [
                {"data_id": f"IQ-R_TA-C_{n}", "prompt": "edit", "img_id": name}
                for n, name in ((1, "a.png"), (2, "b.png"))
            ]
        )
    )
    section = DatasetSection(path=path, image_root=root, limit=1)
    (sample,), _ = read(section, task="p2p")
    (root / "a.png").unlink()
    # Judged before on one dimension; its source image gone, the rest of it cannot be made,
    # yet it is still the sample the limit took: the record past the limit is not read.
    source = DatasetSource(section, "p2p", judged={sample.data_id: sample.digest})
    (entry,) = list(source)
    assert isinstance(entry, QuarantinedRecord) and "'a.png' not found" in entry.reason
    assert source.limit_reached
    # Never judged, a record refused for its content leaves its place to the next.
    samples, refused = read(section, task="p2p")
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_2"] and len(refused) == 1
    # The readers of a run directory count them alike, given its quarantine list.
    assert source.selected_samples(refused={0}, judged={sample.data_id}) == {}
    assert source.selected_samples(refused={0}) == {"IQ-R_TA-C_2": ("IQ-R", "TA-C")}


def test_odd_source_image_names_and_empty_files_are_named_for_what_they_are(
    tmp_path: Path,
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes())
    (root / "empty.png").write_bytes(b"")
    path = tmp_path / "p2p.json"
    img_ids: list[object] = [0, False, "ok.png/", "ok.png/.", "empty.png", "ok.png"]
    path.write_text(
        json.dumps(
            [
                {"data_id": f"IQ-R_TA-C_{n}", "prompt": "edit", "img_id": img_id}
                for n, img_id in enumerate(img_ids)
            ]
        )
    )
    samples, refused = read(DatasetSection(path=path, image_root=root), task="p2p")
    assert [s.img_id for s in samples] == ["ok.png"]
    folder = "ends as a folder's path does, not a file's name: name the image file itself"
    folder += ", without the trailing '/'"
    assert [r.reason for r in refused] == [
        "img_id must be a string, got int",
        "img_id must be a string, got bool",
        f"img_id 'ok.png/' {folder}",
        f"img_id 'ok.png/.' {folder}",
        "source image 'empty.png' is empty (0 bytes)",
    ]
    # As the generator's own decoding says of it.
    with pytest.raises(Exception, match=r"is empty \(0 bytes\)"):
        source_image(samples[0].model_copy(update={"source_path": root / "empty.png"}), (8, 8))


@pytest.mark.parametrize("limit", [None, 1, 2, 4])
def test_identities_read_once_select_what_selected_samples_does(
    tmp_path: Path, limit: int | None
) -> None:
    # A reader of a run directory (watch) selects again from identities it read once, as the
    # quarantine list grows: the same samples as selected_samples, or None when under the
    # limit it needs records past those read.
    path = tmp_path / "ds.json"
    ids = ["IQ-R_TA-C_1", "IQ-R_TA-C_2", "IQ-R_TA-C_2", "bad id", "IQ-O_D-A_3", "IQ-R_TA-C_4"]
    path.write_text(json.dumps([{"data_id": i, "prompt": "p"} for i in ids]))
    source = DatasetSource(DatasetSection(path=path, limit=limit), "t2i")
    for at_least in (None, 1, 2, 3):
        identities = source.sample_identities(at_least=at_least)
        for refused in (set(), {0}, {1, 4}, {0, 1, 5}):
            for judged in (set(), {"IQ-R_TA-C_2"}):
                expected = source.selected_samples(refused=refused, judged=judged)
                got = identities.selected(limit, refused=refused, judged=judged)
                assert got is None or got == expected
                if at_least is None or (limit is not None and at_least >= limit + len(refused)):
                    assert got == expected


def one_record_shard(path: Path, data_id: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"data_id": [data_id], "prompt": ["p"]}).write_parquet(path)


def test_parquet_dataset_names_are_files_not_glob_patterns(tmp_path: Path) -> None:
    # polars read every name as a glob pattern: "p[1].parquet" read p1.parquet, a folder
    # holding both read p1 twice and p[1] never, "a*.parquet" read ab.parquet too, and a
    # folder named "set [v2]" could not be read at all.
    one_record_shard(tmp_path / "p[1].parquet", "IQ-R_TA-C_1")
    one_record_shard(tmp_path / "p1.parquet", "IQ-R_TA-C_2")
    samples, _ = read(DatasetSection(path=tmp_path / "p[1].parquet"))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_1"]
    samples, refused = read(DatasetSection(path=tmp_path))
    assert sorted(s.data_id for s in samples) == ["IQ-R_TA-C_1", "IQ-R_TA-C_2"]
    assert not refused
    one_record_shard(tmp_path / "glob" / "a*.parquet", "IQ-R_TA-C_3")
    one_record_shard(tmp_path / "glob" / "ab.parquet", "IQ-R_TA-C_4")
    samples, _ = read(DatasetSection(path=tmp_path / "glob" / "a*.parquet"))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_3"]
    one_record_shard(tmp_path / "set [v2]" / "part-0.parquet", "IQ-R_TA-C_5")
    one_record_shard(tmp_path / "set v" / "part-0.parquet", "IQ-R_TA-C_6")
    samples, _ = read(DatasetSection(path=tmp_path / "set [v2]"))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_5"]
    # Two shards whose columns differ: the footers compared are those of the files named.
    one_record_shard(tmp_path / "mixed" / "a.parquet", "IQ-R_TA-C_7")
    one_record_shard(tmp_path / "mixed" / "b[c].parquet", "IQ-R_TA-C_8")
    pl.DataFrame({"data_id": ["IQ-R_TA-C_9"], "prompt": ["p"], "x": [1]}).write_parquet(
        tmp_path / "mixed" / "bc.parquet"
    )
    samples, _ = read(DatasetSection(path=tmp_path / "mixed" / "b[c].parquet"))
    assert [s.data_id for s in samples] == ["IQ-R_TA-C_8"]


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_parquet_shard_whose_name_is_not_utf8_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    # polars takes text paths only: a run failed with a traceback ("Object does not have a
    # .read() method") and left a new run directory behind.
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_FATAL

    folder = tmp_path / "pq"
    write_parquet_prompts(folder, 2)
    name = b"caf\xe9.parquet" if where == "file" else b"caf\xe9/part-0.parquet"
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    odd.parent.mkdir(exist_ok=True)
    (folder / "train-00000.parquet").rename(odd)
    config = folder / "config.toml"
    config.write_text(PQ_CONFIG)
    shown = os.fsencode(odd).decode("utf-8", "backslashreplace")
    assert "\\xe9" in shown
    with pytest.raises(DatasetError, match="is not UTF-8") as caught:
        read(DatasetSection(path=folder))
    assert shown in str(caught.value)
    for command in ("validate", "run"):
        args = [command, str(config)] + (["--headless"] if command == "run" else [])
        assert main(args) == EXIT_FATAL
        err = capsys.readouterr().err
        assert f"cannot read parquet dataset file {shown}: its name" in err
        assert "Traceback" not in err
    assert not (folder / "runs").exists()


def test_a_parquet_read_polars_cuts_short_is_not_the_dataset_s_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polars hooks SIGINT and ends a read it interrupts as if the files ended there, without
    # an error: a Ctrl-C while a folder of shards was read gave a dataset of no records.
    folder = tmp_path / "shards"
    folder.mkdir()
    for part in range(3):
        pl.DataFrame({"data_id": [f"IQ-R_TA-C_{part}"], "prompt": ["p"]}).write_parquet(
            folder / f"part-{part}.parquet"
        )
    collect_batches = pl.LazyFrame.collect_batches

    def interrupted(self: pl.LazyFrame, **kwargs: Any) -> Iterator[pl.DataFrame]:
        return iter(list(collect_batches(self, **kwargs))[:0])  # ended before a row

    monkeypatch.setattr(pl.LazyFrame, "collect_batches", interrupted)
    source = DatasetSource(DatasetSection(path=folder), normalise_task("t2i"))
    with pytest.raises(DatasetInterrupted, match="ended after 0 records of the 3 its files hold"):
        list(source)
    with pytest.raises(DatasetInterrupted):
        source.count()
