"""The image_folder generator: images made elsewhere, judged through the engine."""

from __future__ import annotations

import errno
import io
import json
import logging
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.conftest import ConfigFactory
from tests.test_png import BROKEN_IMAGE_DATA, png_with_image_data
from trig_stream import Engine, FatalBackendError
from trig_stream.backends.base import EncodedPicture, GenerationRequest
from trig_stream.backends.generators.image_folder import (
    ImageFolderGenerator,
    ImageFolderOptions,
)
from trig_stream.backends.generators.source_images import source_image
from trig_stream.config import RunConfig
from trig_stream.errors import ItemError
from trig_stream.journal import JOURNAL
from trig_stream.manifest import IMAGES
from trig_stream.png import with_sample_digest
from trig_stream.records import Sample

pytestmark = pytest.mark.anyio


def journal(config: RunConfig) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (config.run_dir / JOURNAL).read_text().splitlines()]


def folder_with_images(root: Path) -> Path:
    """Images for the first 8 ids of the default test dataset, with every kind of defect.

    The dataset's ids are IQ-R_TA-C_1, IQ-A_TA-S_1, R-T_IQ-A_1, D-K_IQ-R_1, then _2 likewise.
    """
    folder = root / "images"
    folder.mkdir()
    made_by = PngInfo()
    made_by.add_text("Software", "elsewhere")  # what a copy as-is keeps, and a re-encoding not
    Image.new("RGB", (24, 24), "red").save(folder / "IQ-R_TA-C_1.png", pnginfo=made_by)
    Image.new("RGB", (20, 30), "blue").save(folder / "IQ-A_TA-S_1.jpg", quality=95)
    Image.new("P", (16, 16)).save(folder / "R-T_IQ-A_1.png")  # palette: converted to RGB
    # D-K_IQ-R_1: missing.
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    (folder / "IQ-R_TA-C_2.png").write_bytes(truncated)
    (folder / "IQ-A_TA-S_2.png").write_bytes(b"this is not an image")
    Image.new("RGB", (8, 8)).save(folder / "R-T_IQ-A_2.gif")  # extension not accepted
    Image.new("RGB", (8, 8)).save(folder / "D-K_IQ-R_2.webp")
    Image.new("RGB", (8, 8)).save(folder / "TA-C_TA-R_99.png")  # matches no sample
    (folder / "notes.txt").write_text("not an image")
    return folder


async def test_image_folder_edge_cases_through_the_engine(
    make_config: ConfigFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = folder_with_images(tmp_path)
    config = make_config(
        samples=8,
        generators=[
            {"name": "elsewhere", "backend": "image_folder", "options": {"path": str(folder)}}
        ],
    )
    options = ImageFolderOptions.model_validate(config.generators[0].options)
    generator = ImageFolderGenerator("elsewhere", options)
    with caplog.at_level(logging.INFO, logger="trig_stream.backends.generators.image_folder"):
        async with Engine(config, generators=[generator]) as engine:
            results = [j async for j in engine.results]
    assert len(results) == 16
    by_id: dict[str, set[str]] = {}
    for record in journal(config):
        by_id.setdefault(record["data_id"], set()).add(record["error"] or "ok")
    ok = {"IQ-R_TA-C_1", "IQ-A_TA-S_1", "R-T_IQ-A_1", "D-K_IQ-R_2"}
    assert {d for d, errors in by_id.items() if errors == {"ok"}} == ok
    (missing,) = by_id["D-K_IQ-R_1"]
    assert missing == f"generate failed: no image for D-K_IQ-R_1 in {folder}"
    (truncated,) = by_id["IQ-R_TA-C_2"]
    assert "cannot read image" in truncated and "IQ-R_TA-C_2.png" in truncated
    (garbage,) = by_id["IQ-A_TA-S_2"]
    # Not Pillow's "cannot identify image file <_io.BytesIO object at 0x7f...>".
    assert garbage == (
        f"generate failed: cannot read image {folder / 'IQ-A_TA-S_2.png'}: it is no image "
        "Pillow can read"
    )
    (wrong_ext,) = by_id["R-T_IQ-A_2"]
    assert "found R-T_IQ-A_2.gif, whose extension is not one of" in wrong_ext

    assert generator.unmatched == ["TA-C_TA-R_99.png"]
    assert generator.ignored == ["R-T_IQ-A_2.gif", "notes.txt"]
    # Said once, in the end-of-run note, not also in a log line worded for a first run.
    (note,) = [n for n in generator.notes() if "TA-C_TA-R_99.png" in n]
    assert note.startswith(f"1 image file(s) in {folder} match no sample of the run")
    assert "TA-C_TA-R_99.png" not in caplog.text

    # Images are copied into the run as PNGs, at their own size; an RGB PNG byte for byte,
    # with only the chunk that names its sample added.
    copied = config.run_dir / IMAGES / "t2i" / "elsewhere"
    ((digest, seed),) = {
        (r["sample_digest"], r["seed"]) for r in journal(config) if r["data_id"] == "IQ-R_TA-C_1"
    }
    source = (folder / "IQ-R_TA-C_1.png").read_bytes()
    label = f"{digest} elsewhere IQ-R_TA-C_1 {seed}"
    # Its pixels checked as it was copied: a resumed run need not inflate it again.
    stored = with_sample_digest(source, label, pixels_whole=True)
    assert (copied / "IQ-R_TA-C_1.png").read_bytes() == stored
    with Image.open(copied / "IQ-A_TA-S_1.png") as image:
        assert image.format == "PNG" and image.size == (20, 30)
    with Image.open(copied / "R-T_IQ-A_1.png") as image:
        assert image.mode == "RGB"


def request(data_id: str) -> GenerationRequest:
    sample = Sample(data_id=data_id, task="t2i", prompt="p", dimensions=("IQ-R", "TA-C"))
    return GenerationRequest("m", sample, 0)


def test_only_still_8_bit_rgb_pngs_are_stored_as_they_are(tmp_path: Path) -> None:
    def png(image: Image.Image, **save: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **save)
        return buffer.getvalue()

    red, blue = Image.new("RGB", (6, 4), "red"), Image.new("RGB", (6, 4), "blue")
    noise = png(Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48))
    files = {
        "IQ-R_TA-C_1": png(red),
        "IQ-R_TA-C_2": png(red.convert("RGBA")),
        "IQ-R_TA-C_3": png(red.convert("L")),
        "IQ-R_TA-C_4": with_sample_digest(png(red), "0123456789abcdef"),  # an earlier run's
        "IQ-R_TA-C_5": png(red, save_all=True, append_images=[blue]),  # animated
        "IQ-R_TA-C_6": noise[: len(noise) // 2],  # truncated
    }
    for data_id, data in files.items():
        (tmp_path / f"{data_id}.png").write_bytes(data)
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    ids = sorted(files)
    out = generator.generate([request(i) for i in ids], worker=0, cancel=threading.Event())
    kept, rgba, grey, earlier, animated, cut = out
    assert isinstance(kept, EncodedPicture) and kept.png == files["IQ-R_TA-C_1"]
    for decoded in (rgba, grey, earlier, animated):
        assert isinstance(decoded, Image.Image) and decoded.mode == "RGB"
    assert isinstance(cut, ItemError) and "cannot read image" in str(cut)


def test_a_16_bit_grey_picture_is_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    # Pillow's own conversion clipped its values at 255: the picture came out almost white.
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(levels).save(tmp_path / "IQ-R_TA-C_1.png")
    with Image.open(tmp_path / "IQ-R_TA-C_1.png") as saved:
        assert saved.mode == "I;16"
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    (picture,) = generator.generate([request("IQ-R_TA-C_1")], worker=0, cancel=threading.Event())
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    assert np.asarray(picture)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(picture).std(axis=2).max() == 0  # grey: the three channels equal


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), [0, 64, 128, 255]),  # 0-1
        (np.array([[-10.0, 50.0, 90.0, 1010.0]], dtype=np.float32), [0, 15, 25, 255]),
        (np.array([[0, 1 << 18, 1 << 19, 1 << 20]], dtype=np.int32), [0, 64, 128, 255]),
        # 8-bit values stored as floats are taken as they are (they were stretched: a
        # picture of one value turned black).
        (np.array([[20.0, 50.4, 90.6, 120.0]], dtype=np.float32), [20, 50, 91, 120]),
        (np.full((1, 4), 128.0, dtype=np.float32), [128] * 4),
        (np.full((1, 4), 300.0, dtype=np.float32), [255] * 4),  # one value past 255: clipped
        (np.full((1, 4), 1 << 20, dtype=np.int32), [255] * 4),  # past 65535: clipped
        (np.array([[0, 255, 257, 65535]], dtype=np.int32), [0, 1, 1, 255]),  # 16 bits
    ],
    ids=[
        "float-0-1",
        "float-own-range",
        "int-32-bit",
        "float-8-bit",
        "float-flat-8-bit",
        "float-flat-past-255",
        "int-flat-past-16-bit",
        "int-16-bit",
    ],
)
def test_a_float_or_32_bit_grey_source_picture_is_scaled_not_clipped(
    tmp_path: Path, values: Any, expected: list[int]
) -> None:
    # Pillow's own conversion clipped a float picture's values (0 to 1) to 0-255: the source
    # picture came out black, and was edited and judged so.
    Image.fromarray(np.repeat(values, 8, axis=0).repeat(4, axis=1)).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as saved:
        assert saved.mode == ("F" if values.dtype == np.float32 else "I")
    common = {"task": "p2p", "prompt": "p", "dimensions": ("IQ-R", "TA-C")}
    sample = Sample(data_id="IQ-R_TA-C_1", source_path=tmp_path / "f.tif", **common)
    picture = np.asarray(source_image(sample))
    assert picture.shape == (8, 16, 3)
    assert picture[0, ::4, 0].tolist() == expected
    assert picture.std(axis=2).max() == 0  # grey: the three channels equal


def test_extension_preference_and_case(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), "red").save(tmp_path / "IQ-R_TA-C_1.PNG")
    Image.new("RGB", (6, 6), "blue").save(tmp_path / "IQ-R_TA-C_1.jpg")
    options = ImageFolderOptions(path=tmp_path, extensions=[".JPG", "png"])
    generator = ImageFolderGenerator("m", options)
    generator.load()
    (image,) = generator.generate([request("IQ-R_TA-C_1")], worker=0, cancel=threading.Event())
    assert isinstance(image, Image.Image) and image.size == (6, 6)
    generator.close()
    assert generator.unmatched == []
    # The file that lost is named in the run's notes.
    assert generator.shadowed == ["IQ-R_TA-C_1.PNG"]
    assert "not used: their sample has a file of an extension earlier" in generator.notes()[0]


def test_an_empty_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "IQ-R_TA-C_1.png").write_bytes(b"")
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    (outcome,) = generator.generate([request("IQ-R_TA-C_1")], worker=0, cancel=threading.Event())
    assert isinstance(outcome, ItemError)
    assert str(outcome) == f"image file {tmp_path / 'IQ-R_TA-C_1.png'} is empty (0 bytes)"


def test_cancelled_requests_read_nothing(tmp_path: Path) -> None:
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    cancel = threading.Event()
    cancel.set()
    (outcome,) = generator.generate([request("IQ-R_TA-C_1")], worker=0, cancel=cancel)
    assert isinstance(outcome, ItemError) and str(outcome) == "cancelled"


def test_missing_folder_is_fatal_naming_the_generator(tmp_path: Path) -> None:
    # It named the folder alone, where every other backend's error names its generator: with
    # several image folders (one per model), which one to fix was left to guess.
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path / "nowhere"))
    with pytest.raises(
        FatalBackendError,
        match=rf"^generator 'm': image folder {tmp_path / 'nowhere'} does not exist .*set "
        r"options\.path",
    ):
        generator.load()


def test_a_folder_that_cannot_be_listed_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # validate said ok for a folder of mode 311; the run then failed to load it (exit 4).
    # Root lists any folder: the refusal is faked where the folder is opened.
    import os

    listed = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path) == tmp_path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return listed(path)

    monkeypatch.setattr(os, "scandir", scandir)
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    with pytest.raises(
        FatalBackendError, match=r"^generator 'm': .* cannot be read: Permission denied; give this"
    ):
        generator.check_environment()


def test_options_refuse_unknown_keys_and_empty_extensions(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ImageFolderOptions.model_validate({"path": str(tmp_path), "image_dirs": "x"})
    with pytest.raises(ValidationError):
        ImageFolderOptions.model_validate({"path": str(tmp_path), "extensions": []})


def sideways(fmt: str, orientation: int = 6) -> bytes:
    """A 40x20 picture, red left and blue right, whose EXIF says to show it turned (6: a
    quarter turn clockwise, 20x40 with red on top)."""
    picture = Image.new("RGB", (40, 20), "blue")
    picture.paste(Image.new("RGB", (20, 20), "red"))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


def assert_upright(picture: object) -> None:
    assert isinstance(picture, Image.Image) and picture.size == (20, 40)
    top, bottom = picture.getpixel((10, 5)), picture.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_picture_stored_sideways_is_turned_as_its_exif_says(tmp_path: Path, fmt: str) -> None:
    # It was stored as the file holds it, 40x20, where every viewer shows it 20x40; an 8-bit
    # RGB PNG was even copied byte for byte.
    (tmp_path / f"IQ-R_TA-C_1.{fmt.lower()}").write_bytes(sideways(fmt))
    (tmp_path / "IQ-R_TA-C_2.png").write_bytes(sideways("PNG", orientation=1))
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    turned, as_stored = generator.generate(
        [request("IQ-R_TA-C_1"), request("IQ-R_TA-C_2")], worker=0, cancel=threading.Event()
    )
    assert_upright(turned)
    assert isinstance(as_stored, EncodedPicture)  # shown as stored: copied as it is


def test_a_source_picture_stored_sideways_is_turned_as_its_exif_says(tmp_path: Path) -> None:
    (tmp_path / "source.jpg").write_bytes(sideways("JPEG"))
    common = {"task": "p2p", "prompt": "p", "dimensions": ("IQ-R", "TA-C")}
    from_file = Sample(data_id="IQ-R_TA-C_1", source_path=tmp_path / "source.jpg", **common)
    embedded = Sample(data_id="IQ-R_TA-C_2", source_bytes=sideways("JPEG"), **common)
    assert_upright(source_image(from_file))
    assert_upright(source_image(embedded))


def with_exif_chunk(picture: Image.Image, payload: bytes) -> bytes:
    """``picture`` as a PNG with an ``eXIf`` chunk (its CRC right) holding ``payload``, right
    after the header chunk."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = buffer.getvalue()
    chunk = b"eXIf" + payload
    return (
        data[:33]
        + struct.pack(">I", len(payload))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + data[33:]
    )


def wide_picture() -> Image.Image:
    """40x20, red left and blue right: as :func:`sideways` stores it."""
    picture = Image.new("RGB", (40, 20), "blue")
    picture.paste(Image.new("RGB", (20, 20), "red"))
    return picture


TIFF_HEADER = b"MM\x00\x2a\x00\x00\x00\x08"


@pytest.mark.parametrize(
    "payload",
    [b"garbage!!", TIFF_HEADER, TIFF_HEADER + b"\xff\xff"],
    ids=["not-tiff", "no-directory", "directory-cut"],
)
def test_a_picture_whose_exif_cannot_be_read_is_taken_as_stored(
    tmp_path: Path, payload: bytes
) -> None:
    # Every viewer shows it, as stored: it became "cannot read image ...: not a TIFF file", and
    # Pillow's "Corrupt EXIF data" warnings reached the run's output.
    as_rgb = with_exif_chunk(wide_picture(), payload)
    (tmp_path / "IQ-R_TA-C_1.png").write_bytes(as_rgb)
    (tmp_path / "IQ-R_TA-C_2.png").write_bytes(
        with_exif_chunk(wide_picture().convert("P"), payload)
    )
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    common = {"task": "p2p", "prompt": "p", "dimensions": ("IQ-R", "TA-C")}
    embedded = Sample(data_id="IQ-R_TA-C_3", source_bytes=as_rgb, **common)
    with warnings.catch_warnings(record=True) as caught:  # as Python shows them by default
        copied, decoded = generator.generate(
            [request("IQ-R_TA-C_1"), request("IQ-R_TA-C_2")], worker=0, cancel=threading.Event()
        )
        source = source_image(embedded)
    assert isinstance(copied, EncodedPicture) and copied.png == as_rgb  # as before 9b9006b
    assert isinstance(decoded, Image.Image) and decoded.size == (40, 20)
    assert source.size == (40, 20)
    assert [str(w.message) for w in caught] == []


RATIONAL_ORIENTATION = (
    TIFF_HEADER
    + struct.pack(">HHHII", 1, 0x0112, 5, 1, 26)  # one entry: a rational, at offset 26
    + struct.pack(">III", 0, 6, 1)  # no next directory; 6/1
)


@pytest.mark.parametrize("mode", ["RGB", "P", "LA", "I;16"])
def test_an_orientation_that_is_no_integer_is_taken_as_stored_whatever_the_pictures_mode(
    tmp_path: Path, mode: str
) -> None:
    # 6/1 left an 8-bit RGB PNG unturned (copied byte for byte) but turned a P, LA or 16-bit
    # one (decoded) with the same chunk.
    picture = wide_picture().convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        picture = Image.fromarray(np.asarray(picture, dtype=np.uint16) * 257)
    (tmp_path / "IQ-R_TA-C_1.png").write_bytes(with_exif_chunk(picture, RATIONAL_ORIENTATION))
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    (outcome,) = generator.generate([request("IQ-R_TA-C_1")], worker=0, cancel=threading.Event())
    if isinstance(outcome, EncodedPicture):
        outcome = Image.open(io.BytesIO(outcome.png))
    assert isinstance(outcome, Image.Image) and outcome.size == (40, 20)


def test_files_whose_extensions_differ_in_case_alone_follow_a_stated_rule(
    tmp_path: Path,
) -> None:
    # x.PNG was used because upper case sorts first, and the note said x.png lost to "a file
    # of an extension earlier in extensions".
    Image.new("RGB", (4, 4), "red").save(tmp_path / "IQ-R_TA-C_1.PNG", format="PNG")
    Image.new("RGB", (6, 6), "blue").save(tmp_path / "IQ-R_TA-C_1.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "IQ-R_TA-C_2.PNG", format="PNG")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "IQ-R_TA-C_2.Png", format="PNG")
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    first, _ = generator.generate(
        [request("IQ-R_TA-C_1"), request("IQ-R_TA-C_2")], worker=0, cancel=threading.Event()
    )
    assert isinstance(first, EncodedPicture)
    assert first.png == (tmp_path / "IQ-R_TA-C_1.png").read_bytes()
    generator.close()
    assert generator.shadowed == []
    assert generator.twins == [
        ("IQ-R_TA-C_1.png", "IQ-R_TA-C_1.PNG"),
        ("IQ-R_TA-C_2.PNG", "IQ-R_TA-C_2.Png"),
    ]
    (note,) = generator.notes()
    assert note == (
        f"2 sample(s) in {tmp_path} have two files whose extensions differ in case alone (the "
        "one with the lower-case extension is used, else the first by name): IQ-R_TA-C_1.png "
        "used, IQ-R_TA-C_1.PNG ignored; IQ-R_TA-C_2.PNG used, IQ-R_TA-C_2.Png ignored"
    )


def test_a_missing_image_names_a_file_differing_in_case_alone(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), "red").save(tmp_path / "iq-r_ta-c_2.png")
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    (outcome,) = generator.generate([request("IQ-R_TA-C_2")], worker=0, cancel=threading.Event())
    assert isinstance(outcome, ItemError)
    assert str(outcome) == (
        f"no image for IQ-R_TA-C_2 in {tmp_path} (found iq-r_ta-c_2.png, whose name differs "
        "from the data_id in case alone: rename it to IQ-R_TA-C_2.png)"
    )


@pytest.mark.parametrize("damage", sorted(BROKEN_IMAGE_DATA))
def test_a_png_whose_pixels_do_not_decode_is_the_samples_error(tmp_path: Path, damage: str) -> None:
    # Every chunk's CRC is right, so Pillow's verify passes it: copied as it was, it was
    # judged (a score for a broken picture) or failed in the judge.
    (tmp_path / "IQ-R_TA-C_1.png").write_bytes(png_with_image_data(BROKEN_IMAGE_DATA[damage]))
    generator = ImageFolderGenerator("m", ImageFolderOptions(path=tmp_path))
    generator.load()
    (outcome,) = generator.generate([request("IQ-R_TA-C_1")], worker=0, cancel=threading.Event())
    assert isinstance(outcome, ItemError), outcome
    assert f"cannot read image {tmp_path / 'IQ-R_TA-C_1.png'}: " in str(outcome)


async def test_pngs_without_image_data_fail_their_samples_and_never_stop_the_run(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # Pillow's verify raised IndexError on them, taken for the generator's failure: four in a
    # row stopped the run ("has made no image yet and its first 4 calls all failed").
    folder = tmp_path / "images"
    folder.mkdir()
    broken = ["IQ-R_TA-C_1", "IQ-A_TA-S_1", "R-T_IQ-A_1", "D-K_IQ-R_1", "IQ-R_TA-C_2"]
    for data_id in broken:
        (folder / f"{data_id}.png").write_bytes(png_with_image_data(None))
    for data_id in ("IQ-A_TA-S_2", "R-T_IQ-A_2", "D-K_IQ-R_2"):
        Image.new("RGB", (16, 16), "red").save(folder / f"{data_id}.png")
    config = make_config(
        samples=8,
        generators=[
            {"name": "elsewhere", "backend": "image_folder", "options": {"path": str(folder)}}
        ],
    )
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
    assert len(results) == 16
    errors = {r["data_id"]: (r["error"], r["error_stage"]) for r in journal(config) if r["error"]}
    assert sorted(errors) == sorted(broken)
    for data_id in broken:
        assert errors[data_id] == (
            f"generate failed: cannot read image {folder / data_id}.png: not a readable PNG: "
            "it has no image data (no IDAT chunk); replace the file",
            "generate",
        )


EIGHT_SAMPLES = [
    f"{pair}_{n}" for n in (1, 2) for pair in ("IQ-R_TA-C", "IQ-A_TA-S", "R-T_IQ-A", "D-K_IQ-R")
]
"""The data_ids of ``make_config(samples=8)``."""


def folder_with_one_unmatched(tmp_path: Path, ids: list[str]) -> Path:
    """A folder of an 8x8 picture for each of ``ids``, and one, ``TA-C_TA-R_99.png``, that
    matches no sample."""
    folder = tmp_path / "images"
    folder.mkdir()
    for data_id in [*ids, "TA-C_TA-R_99"]:
        Image.new("RGB", (8, 8), "red").save(folder / f"{data_id}.png")
    return folder


class BlocksFromTheThirdSample(ImageFolderGenerator):
    """An image folder whose third request waits until the test has stopped the run."""

    def __init__(self, name: str, options: ImageFolderOptions) -> None:
        super().__init__(name, options)
        self.stopped = threading.Event()
        self.third = threading.Event()  # its third request has begun
        self.calls = 0

    def generate(
        self, requests: Any, *, worker: int, cancel: threading.Event
    ) -> list[Image.Image | EncodedPicture | Exception]:
        self.calls += 1
        if self.calls == 3:
            self.third.set()
            assert self.stopped.wait(60)  # a safety net: the test sets it at once
        return super().generate(requests, worker=worker, cancel=cancel)


async def test_a_stopped_run_does_not_name_the_files_it_never_reached_as_unused(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # A stopped run said "8 image file(s) ... were not asked for in this run (no such sample,
    # filtered out, or already judged)" of the samples it had not reached yet.
    folder = folder_with_one_unmatched(tmp_path, EIGHT_SAMPLES)

    def config_of(name: str) -> RunConfig:
        return make_config(
            samples=8,
            generators=[
                {"name": "elsewhere", "backend": "image_folder", "options": {"path": str(folder)}}
            ],
            run={"name": name},
        )

    options = ImageFolderOptions(path=folder)
    stopped = BlocksFromTheThirdSample("elsewhere", options)
    async with Engine(config_of("stopped"), generators=[stopped]) as engine:

        async def stop_in_the_third_request() -> None:
            # Stopped once the third request has begun, not at the first judgement: on a
            # loaded machine that came before the generator's thread reached its third.
            assert await anyio.to_thread.run_sync(stopped.third.wait, 60)
            engine.stop()
            stopped.stopped.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stop_in_the_third_request)
            async for _ in engine.results:
                pass
    assert engine.stats().state == "stopped"
    assert stopped.calls == 3  # samples 4 to 8 were never asked for
    assert stopped.unmatched == []
    assert not [note for note in stopped.notes() if "match no sample" in note]

    finished = ImageFolderGenerator("elsewhere", options)
    async with Engine(config_of("finished"), generators=[finished]) as engine:
        results = [j async for j in engine.results]
    assert len(results) == 16
    assert finished.unmatched == ["TA-C_TA-R_99.png"]
    (note,) = [n for n in finished.notes() if "match no sample" in n]
    assert note.startswith(f"1 image file(s) in {folder} match no sample of the run")


async def test_a_resume_names_only_the_files_that_match_no_sample(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # The resume of a stopped run listed the samples the first run had judged as "not asked
    # for in this run (no such sample, filtered out, or already judged)", hiding among them
    # the one file that matches no sample.
    folder = folder_with_one_unmatched(tmp_path, EIGHT_SAMPLES)
    config = make_config(
        samples=8,
        generators=[
            {"name": "elsewhere", "backend": "image_folder", "options": {"path": str(folder)}}
        ],
    )
    options = ImageFolderOptions(path=folder)
    stopped = BlocksFromTheThirdSample("elsewhere", options)
    async with Engine(config, generators=[stopped]) as engine:
        async for _ in engine.results:
            if not stopped.stopped.is_set():
                engine.stop()
                stopped.stopped.set()
    assert engine.stats().state == "stopped"
    judged = {r["data_id"] for r in journal(config)}
    assert judged and len(judged) < len(EIGHT_SAMPLES)

    resumed = ImageFolderGenerator("elsewhere", options)
    async with Engine(config, generators=[resumed]) as engine:
        results = [j async for j in engine.results]
    assert engine.stats().state == "done"
    assert {r.data_id for r in results} == set(EIGHT_SAMPLES) - judged  # judged: passed over
    assert resumed.unmatched == ["TA-C_TA-R_99.png"]
    (note,) = [n for n in resumed.notes() if "match no sample" in n]
    assert note == (
        f"1 image file(s) in {folder} match no sample of the run's dataset selection (no such "
        "sample, or filtered out): TA-C_TA-R_99.png"
    )

    # Nothing left to generate: the generator never loads, and says nothing of its files.
    again = ImageFolderGenerator("elsewhere", options)
    async with Engine(config, generators=[again]) as engine:
        assert [j async for j in engine.results] == []
    assert again.unmatched == []
    assert again.notes() == []


async def test_a_resume_passes_over_the_samples_whose_images_it_reuses(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # An image an earlier run wrote but did not judge is reused, not asked for: its file is
    # the sample's all the same.
    ids = ["IQ-R_TA-C_1", "IQ-A_TA-S_1", "R-T_IQ-A_1"]
    folder = folder_with_one_unmatched(tmp_path, ids)
    config = make_config(
        samples=3,
        generators=[
            {"name": "elsewhere", "backend": "image_folder", "options": {"path": str(folder)}}
        ],
    )
    options = ImageFolderOptions(path=folder)
    async with Engine(config, generators=[ImageFolderGenerator("elsewhere", options)]) as engine:
        assert len([j async for j in engine.results]) == 6
    # Forget the judgements of the first two samples: the first keeps its image, to be
    # reused; the second's is made again (the generator loads).
    lines = (config.run_dir / JOURNAL).read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["data_id"] not in ids[:2]]
    assert len(kept) == 2
    (config.run_dir / JOURNAL).write_text("".join(kept))
    (made_again,) = (config.run_dir / IMAGES).rglob(f"{ids[1]}.png")
    made_again.unlink()

    resumed = ImageFolderGenerator("elsewhere", options)
    async with Engine(config, generators=[resumed]) as engine:
        results = [j async for j in engine.results]
    assert {r.data_id for r in results} == set(ids[:2])
    counts = engine.stats().models["elsewhere"]
    assert (counts.reused, counts.generated) == (1, 1)
    assert resumed.unmatched == ["TA-C_TA-R_99.png"]


async def test_the_files_of_quarantined_records_are_not_named_as_matching_no_sample(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # A quarantined record's file was said to "match no sample of the run's dataset selection
    # (no such sample, or filtered out)": the record is there, and quarantine.jsonl says why
    # it was set aside.
    records = [
        {"data_id": "IQ-R_TA-C_1", "prompt": "fine", "dimension": ["IQ-R", "TA-C"]},
        {"data_id": "IQ-R_TA-C_2", "prompt": "", "dimension": ["IQ-R", "TA-C"]},
    ]
    dataset = tmp_path / "one_refused.json"
    dataset.write_text(json.dumps(records))
    folder = folder_with_one_unmatched(tmp_path, ["IQ-R_TA-C_1", "IQ-R_TA-C_2"])
    config = make_config(
        dataset={"path": str(dataset)},
        generators=[
            {"name": "elsewhere", "backend": "image_folder", "options": {"path": str(folder)}}
        ],
    )
    generator = ImageFolderGenerator("elsewhere", ImageFolderOptions(path=folder))
    async with Engine(config, generators=[generator]) as engine:
        assert len([j async for j in engine.results]) == 2
    assert engine.stats().quarantined == 1
    assert generator.unmatched == ["TA-C_TA-R_99.png"]


def test_a_second_load_indexes_the_folder_afresh(tmp_path: Path) -> None:
    # load() kept the first index and added the folder again: the unused-files note listed
    # every file twice.
    for name in ("IQ-R_TA-C_1.png", "IQ-R_TA-C_2.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    generator = ImageFolderGenerator("g", ImageFolderOptions(path=tmp_path))
    generator.load()
    generator.all_requested(frozenset())
    generator.close()
    first = (generator.unmatched, generator.ignored, generator.notes())
    generator.load()
    generator.all_requested(frozenset())
    generator.close()
    assert (generator.unmatched, generator.ignored, generator.notes()) == first
    assert generator.unmatched == ["IQ-R_TA-C_1.png", "IQ-R_TA-C_2.png"]


class BlocksTheLastCall(ImageFolderGenerator):
    """An image folder whose eighth call (of one sample each) waits until the test lets it
    go: the run's last sample, generating."""

    def __init__(self, name: str, options: ImageFolderOptions) -> None:
        super().__init__(name, options)
        self.reached = threading.Event()
        self.go = threading.Event()
        self.calls = 0

    def generate(
        self, requests: Any, *, worker: int, cancel: threading.Event
    ) -> list[Image.Image | EncodedPicture | Exception]:
        self.calls += 1
        if self.calls == 8:
            self.reached.set()
            assert self.go.wait(60)  # a safety net: the test lets it go at once
        return super().generate(requests, worker=worker, cancel=cancel)


async def test_a_stop_while_the_last_sample_generates_still_names_unused_files(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A graceful stop that came once every sample was asked for (the last one generating)
    # counted as a stop that left samples unreached: the unused file went unnamed.
    import anyio

    import trig_stream.engine
    from trig_stream.stats import Counters

    dataset_read = anyio.Event()

    class Watched(Counters):
        def __setattr__(self, name: str, value: object) -> None:
            super().__setattr__(name, value)
            if name == "dataset_read" and value:
                dataset_read.set()

    monkeypatch.setattr(trig_stream.engine, "Counters", Watched)
    folder = folder_with_one_unmatched(tmp_path, EIGHT_SAMPLES)
    config = make_config(
        samples=8,
        generators=[
            {"name": "elsewhere", "backend": "image_folder", "options": {"path": str(folder)}}
        ],
    )
    generator = BlocksTheLastCall("elsewhere", ImageFolderOptions(path=folder))
    try:
        async with Engine(config, generators=[generator]) as engine:
            with anyio.fail_after(60):  # a safety net
                await anyio.to_thread.run_sync(generator.reached.wait)
                await dataset_read.wait()
            engine.stop()
            generator.go.set()
            async for _ in engine.results:
                pass
    finally:
        generator.go.set()
    assert generator.calls == 8  # every sample was asked for
    assert generator.unmatched == ["TA-C_TA-R_99.png"]
    (note,) = [n for n in generator.notes() if "match no sample" in n]
    assert note.startswith(f"1 image file(s) in {folder} match no sample of the run")
