"""What an OpenAI-protocol judge request carries beyond its texts, and what its answer holds.

:func:`encode_image` makes the image's ``data:`` URL (its bytes as they are, or shrunk under a
pixel cap); :func:`reply_of` reads the first token's top logprobs out of a chat completion,
checking each entry's types, since a third-party server's answer is not trusted: nor is what
it puts in it, so the API key is masked in all it takes from the answer (a server may echo the
key it received, as a token or as a logprob).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from trig_stream.backends.api_keys import SHORT_KEY_CHARS, scrub
from trig_stream.backends.base import JudgeReply, shrunk_size
from trig_stream.backends.judges.http_errors import server_reason
from trig_stream.backends.judges.transports import EncodedImage
from trig_stream.errors import ItemError, RetryableError
from trig_stream.pillow_warnings import quiet_pillow
from trig_stream.png import encode_png
from trig_stream.records import storable_text


def cut_by_filter(completion: Any) -> bool:
    # An answer a content filter cut off (Azure's finish_reason) may carry no logprobs: it is
    # that request's, and says nothing of what the server returns for the others.
    try:
        return bool(completion["choices"][0].get("finish_reason") == "content_filter")
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


def reply_of(
    completion: Any, endpoint: str, *, top_logprobs: int = 20, secret: str | None = None
) -> JudgeReply:
    """The reply in a chat completion (decoded JSON): the first token's top logprobs and text.

    Args:
        completion: the decoded answer.
        endpoint: the server's URL, for messages.
        top_logprobs: how many alternatives were asked for. With 0 the chosen token alone
            is the list; otherwise an answer without the list has no top logprobs: scoring
            the one token the server happened to sample (at temperature 1) would be a
            confident score from a single draw.
        secret: the API key in use, masked (:func:`~trig_stream.backends.api_keys.scrub`)
            in the tokens and text of the reply and in a malformed answer's message: they are
            stored in the judgements, quoted in their errors (no rating word among the
            tokens ...), logged and reported. In the tokens and text only a key of
            :data:`~trig_stream.backends.api_keys.SHORT_KEY_CHARS` characters or more is
            masked: a shorter one (a local server's ``Good``) may be a rating word itself,
            and masking it would shift every score; the message masks it all the same.

    Raises:
        RetryableError: the completion is not shaped like one (a malformed answer).
    """
    answered = secret if secret is not None and len(secret) >= SHORT_KEY_CHARS else None
    said = completion.get("error") if isinstance(completion, dict) else None
    if said and "choices" not in completion:
        # An error sent with a 200 (some servers do): what it says is the reason, not the
        # field the answer lacks.
        reason = server_reason(said, secret)
        raise RetryableError(f"judge at {endpoint}: malformed answer (an error: {reason})")
    try:
        choice = completion["choices"][0]
        message = choice.get("message") or {}
        text = scrub(str(message.get("content") or ""), answered)
        content = (choice.get("logprobs") or {}).get("content")
        if not content:
            return JudgeReply(top_logprobs=None, text=text)
        first = content[0]
        top = [_token_logprob(e, answered) for e in first.get("top_logprobs") or ()]
        if not top:
            if top_logprobs > 0:  # the server dropped the list it was asked for
                return JudgeReply(top_logprobs=None, text=text)
            # top_logprobs = 0 asks for the chosen token only
            top = [_token_logprob(first, answered)]
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError) as exc:
        # The message quotes the answer (a logprob that is the key, in its repr).
        problem = scrub(f"{type(exc).__name__}: {exc}", secret)
        raise RetryableError(f"judge at {endpoint}: malformed answer ({problem})") from None
    return JudgeReply(top_logprobs=top, text=text)


def _token_logprob(entry: Any, secret: str | None) -> tuple[str, float]:
    # A token is a JSON string and a logprob a JSON number: ``true``, ``"-0.1"`` or a null
    # token would otherwise pass as 1.0, -0.1 or the word "None".
    token, logprob = entry["token"], entry["logprob"]
    if not isinstance(token, str):
        raise TypeError(f"token {token!r} is not a string")
    if not isinstance(logprob, int | float) or isinstance(logprob, bool):
        raise TypeError(f"logprob {logprob!r} of token {token!r} is not a number")
    return storable_text(scrub(token, secret)), float(logprob)


def encode_image(path: Path, max_pixels: int | None = None) -> EncodedImage:
    """A ``data:`` URL of the image file, shrunk to at most ``max_pixels`` when given.

    Raises:
        ItemError: the file cannot be read, is not an image, or has more pixels than Pillow
            agrees to decode (a decompression bomb).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ItemError(f"cannot read image {path}: {exc.strerror or exc}") from None
    # The common case, a PNG or JPEG sent as it is, needs no decoding: its signature names
    # its format, and the judge server decodes it anyway.
    fmt = _sniff_format(data) if max_pixels is None else None
    if fmt is None:
        data, fmt = _decoded(path, data, max_pixels)
    return EncodedImage.data_url(f"image/{fmt}", data)


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"))


def _sniff_format(data: bytes) -> str | None:
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _decoded(path: Path, data: bytes, max_pixels: int | None) -> tuple[bytes, str]:
    # The image's bytes and format after opening it: re-encoded as PNG when it is shrunk.
    from PIL import Image, UnidentifiedImageError

    quiet_pillow()  # a palette's transparency is dropped on purpose, as vLLM drops it
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "PNG").lower()
            if max_pixels is not None and image.width * image.height > max_pixels:
                size = shrunk_size(image.width, image.height, max_pixels)
                # Only the size changes: vLLM flattens an RGBA image onto white, so its alpha
                # is kept for the server to flatten; any other mode it converts plainly,
                # showing what lies under transparent pixels, and so does this.
                working = image.convert("RGBA" if image.mode == "RGBA" else "RGB")
                resized = working.resize(size, Image.Resampling.LANCZOS)
                data, fmt = encode_png(resized), "png"
    except (UnidentifiedImageError, ValueError, SyntaxError, OSError):
        raise ItemError(f"{path} is not a readable image") from None
    except Image.DecompressionBombError as exc:  # more pixels than Pillow decodes
        raise ItemError(f"cannot read image {path}: {exc}") from None
    return data, fmt
