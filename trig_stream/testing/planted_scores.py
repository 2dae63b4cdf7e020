"""Rating distributions with planted relations between dimensions, for the loopback judge.

The simulated judge answers every (image, dimension) question with the top logprobs of a
five-word rating. What it answers is a pure function of the image and the dimension, so the two
questions about one image are consistent and a repeated question gets the same answer.

Each image has a latent quality per dimension, a standard normal ``z_d``. The two dimensions of
a planted pair share one factor per image, the pair's own: with loadings ``a`` and ``b``,
``z_A = a·g_AB + √(1-a²)·e_A`` and ``z_B = b·g_AB + √(1-b²)·e_B``, where ``g_AB``, ``e_A`` and
``e_B`` are independent normals drawn from a hash of the image (and of the pair, for
``g_AB``), so ``corr(z_A, z_B) = a·b``. A planted correlation ``c`` sets ``a = √|c|`` and
``b = sign(c)·√|c|``. Every dimension may appear in at most one planted pair, and no two pairs
share a factor, which keeps each planted correlation exact and leaves every other pair
uncorrelated.

The latent becomes the centre of a peaked distribution over the rating words: the higher
``z_d``, the better the rating, so rank correlations of the scores follow the latents.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Final

from trig_stream.dimensions import Dimension, split_pair

RATING_TOKENS: Final[tuple[str, ...]] = ("Excellent", "Good", "Medium", "Bad", "Terr")
"""First-token forms of the five ratings, best first; every one is in both scorers' sets."""

FILLER_TOKENS: Final[tuple[str, ...]] = (
    "The",
    "This",
    "I",
    "**",
    "Overall",
    "It",
    "A",
    "Based",
    "Image",
    "Rating",
    "Score",
    "My",
    "Answer",
    "Here",
    "Looking",
    "Okay",
    "Sure",
    "One",
    "Word",
    "In",
)
"""Tokens that name no rating, filling the tail of the top-logprobs list as a model's would."""

_NORMAL: Final = NormalDist()
SHARPNESS: Final[float] = 1.5
"""How peaked a rating distribution is around its centre (larger: more confident)."""


def unit_from(*parts: object) -> float:
    """A number in the open interval (0, 1) from a hash of ``parts``."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2**64


def normal_from(*parts: object) -> float:
    """A standard normal draw from a hash of ``parts``."""
    return _NORMAL.inv_cdf(unit_from(*parts))


@dataclass(frozen=True)
class Loading:
    """How a dimension of a planted pair loads on that pair's shared factor."""

    pair: str
    """The planted pair (``A_B``), naming the factor: each pair has its own."""
    weight: float
    """The loading, in ``[-1, 1]``."""


def loadings(correlations: Mapping[str, float]) -> dict[Dimension, Loading]:
    """The loading of each dimension of a planted pair on its pair's shared factor.

    Args:
        correlations: planted correlations by pair name ``A_B``, each in ``[-1, 1]``.

    Raises:
        ValueError: a pair name is invalid, a value is out of range, or a dimension appears
            in two planted pairs.
    """
    result: dict[Dimension, Loading] = {}
    for pair, value in correlations.items():
        first, second = split_pair(pair)
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"planted correlation of {pair} must be in [-1, 1], got {value}")
        for dimension in (first, second):
            if dimension in result:
                raise ValueError(
                    f"dimension {dimension} appears in two planted pairs; each dimension may "
                    "carry at most one planted correlation"
                )
        root = math.sqrt(abs(value))
        factor = f"{first}_{second}"
        result[first] = Loading(factor, root)
        result[second] = Loading(factor, math.copysign(root, value))
    return result


def latent(image_key: str, dimension: str, loading: Loading | None, *, seed: int) -> float:
    """The latent quality ``z`` of one image on one dimension (a standard normal).

    Args:
        image_key: what identifies the image.
        dimension: the dimension asked about.
        loading: the dimension's loading on its planted pair's factor (see :func:`loadings`);
            None for a dimension in no planted pair.
        seed: the simulation's seed.
    """
    own = normal_from(seed, image_key, dimension)
    if loading is None:
        return own
    shared = normal_from(seed, image_key, "shared", loading.pair)
    weight = loading.weight
    return weight * shared + math.sqrt(max(0.0, 1.0 - weight * weight)) * own


def rating_logprobs(z: float, *, limit: int = 20) -> list[tuple[str, float]]:
    """Top logprobs of the first answer token for latent quality ``z``, most likely first.

    The five rating tokens carry almost all the mass; filler tokens fill the list up to
    ``limit`` with tiny probabilities, as a real model's tail would.
    """
    centre = 4.0 * (1.0 - _NORMAL.cdf(z))  # 0 is "Excellent", 4 is "Terr"
    energies = [-SHARPNESS * (index - centre) ** 2 for index in range(len(RATING_TOKENS))]
    peak = max(energies)
    rating_mass = 0.999
    norm = math.log(sum(math.exp(e - peak) for e in energies)) + peak
    pairs = [
        (token, energy - norm + math.log(rating_mass))
        for token, energy in zip(RATING_TOKENS, energies, strict=True)
    ]
    filler_count = max(0, limit - len(pairs))
    for index, token in enumerate(FILLER_TOKENS[:filler_count]):
        pairs.append((token, math.log(1.0 - rating_mass) - 1.0 - 0.5 * index))
    pairs.sort(key=lambda pair: -pair[1])
    return pairs[:limit]
