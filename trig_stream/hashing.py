"""Deterministic numbers from names: generation seeds, and the choices of the test backends."""

from __future__ import annotations

import hashlib


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the given parts, the same on every machine."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def seed_for(base_seed: int, model: str, data_id: str) -> int:
    """The generation seed of one (model, data_id): stable across runs and machines."""
    return int(unit_hash("seed", base_seed, model, data_id) * 2**31)
