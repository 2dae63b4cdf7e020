"""Deterministic numbers from names: generation seeds, sample digests, and the choices of the
test backends."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Final


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the given parts, the same on every machine."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def seed_for(base_seed: int, model: str, data_id: str) -> int:
    """The generation seed of one (model, data_id): stable across runs and machines."""
    return int(unit_hash("seed", base_seed, model, data_id) * 2**31)


def seeds_for(base_seed: int, model: str) -> Callable[[str], int]:
    """:func:`seed_for` of ``model`` as a function of the data_id, the same numbers with the
    common part hashed once: a resume checks the seed of every image its journal holds."""
    start = hashlib.blake2b(
        "\x1f".join(("seed", str(base_seed), model, "")).encode(), digest_size=8
    )

    def seed(data_id: str) -> int:
        digest = start.copy()
        digest.update(data_id.encode())
        return int(int.from_bytes(digest.digest(), "big") / 2**64 * 2**31)

    return seed


_SEPARATOR: Final = "\x1f"


def sample_digest(task: str, prompt: str, pair: str, item: str | None, img_id: str) -> str:
    """16 hex digits naming what a sample asks: its prompt, pair, subject item and (p2p, s2p)
    source image name. A resumed run compares them with those its journal recorded (see
    ``dataset``)."""
    source = "" if task == "t2i" else img_id  # a t2i sample has no source image to name
    fields = (prompt, pair, "\x00" if item is None else item, source)
    if any(_SEPARATOR in field for field in fields):
        # Joined, text moved across a separator a field holds (from the prompt into the item)
        # would keep the digest. Such fields are written as a JSON list instead, which escapes
        # every \x1f and so never equals a joined text, which holds three; every other sample
        # keeps the digest the run directories judged so far recorded.
        text = json.dumps([prompt, pair, item, source])
    else:
        text = _SEPARATOR.join(fields)
    # JSON may hold a lone surrogate, which strict UTF-8 refuses: it still names the text.
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
