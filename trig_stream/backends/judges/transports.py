"""How the ``openai`` judge sends a chat completion request and gets the decoded answer.

Two transports behind one small interface (:class:`Transport`):

* :class:`AiohttpTransport` (``client = "aiohttp"``, the default) posts the JSON body with one
  ``aiohttp`` session per endpoint and decodes the answer with :func:`json.loads`. A judge
  reads one field of each answer, so this is all the work a request needs.
* :class:`SdkTransport` (``client = "sdk"``) posts through ``openai.AsyncOpenAI`` on its
  aiohttp transport. Each request then also builds the SDK's request models and headers,
  which measured ~1 ms more CPU per request here than the whole aiohttp path
  (``bench/engine_cpu.py``): at a few hundred requests per second, that is a core.

Both send the same body and headers (bearer key, JSON), never retry (the engine owns
retries), and raise the same :mod:`~trig_stream.backends.judges.http_errors` classes for the
same failures, so a run's judgements do not depend on the transport.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, Protocol

from trig_stream.backends.judges.http_errors import (
    classify,
    connection_error,
    malformed_error,
    status_error,
    timeout_error,
)

if TYPE_CHECKING:
    import aiohttp
    import openai

Client = Literal["aiohttp", "sdk"]
"""The names of the transports, as ``options.client`` gives them."""


class Transport(Protocol):
    """Posts chat completion bodies to one endpoint."""

    url: str
    """The endpoint's base URL (``.../v1``)."""

    async def post(self, body: dict[str, Any]) -> Any:
        """The decoded JSON answer to ``body``.

        Raises:
            BackendError: the request failed; the subclass says how (see ``http_errors``).
        """
        ...

    async def aclose(self) -> None:
        """Close the connections; safe to repeat."""
        ...


class AiohttpTransport:
    """Posts with a plain ``aiohttp`` session: one JSON encode, one decode per request.

    Args:
        url: the endpoint's base URL.
        secret: the API key, or None for a keyless local server.
        key_source: where the key came from, for the credentials message.
        timeout_s: the most a request may take, connection included.
    """

    def __init__(self, url: str, secret: str | None, key_source: str, timeout_s: float) -> None:
        self.url = url
        self._target = url.rstrip("/") + "/chat/completions"
        self._secret = secret
        self._key_source = key_source
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Authorization": f"Bearer {secret or 'EMPTY'}",
        }
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # the headers hold the key: never show them
        return f"AiohttpTransport(url={self.url!r})"

    def _open_session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                # The judge's limiter bounds requests in flight; the connector adds none.
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )
        return self._session

    async def post(self, body: dict[str, Any]) -> Any:
        import aiohttp

        session = self._open_session()
        data = json.dumps(body, separators=(",", ":")).encode()
        try:
            async with session.post(self._target, data=data, headers=self._headers) as response:
                status = response.status
                raw = await response.read()
                headers = dict(response.headers)
        except TimeoutError:  # asyncio's is the builtin since 3.11
            raise timeout_error(self.url, self._timeout_s) from None
        except aiohttp.ClientPayloadError:
            raise connection_error(self.url, "the answer was cut off") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise connection_error(self.url, type(exc).__name__) from None
        if status >= 400:
            raise status_error(
                status,
                headers,
                _error_body(raw),
                endpoint=self.url,
                secret=self._secret,
                key_source=self._key_source,
            )
        try:
            return json.loads(raw)
        except ValueError:
            raise malformed_error(self.url, "the body is not JSON") from None

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class SdkTransport:
    """Posts through ``openai.AsyncOpenAI`` (aiohttp transport, the SDK's retries off).

    The SDK's generic ``post`` with ``cast_to=object`` returns the answer as plain JSON:
    the typed ``ChatCompletion`` path would walk every top logprob of every answer.
    """

    def __init__(self, url: str, secret: str | None, key_source: str, timeout_s: float) -> None:
        import openai

        self.url = url
        self._secret = secret
        self._key_source = key_source
        self._timeout_s = timeout_s
        self._client: openai.AsyncOpenAI | None = openai.AsyncOpenAI(
            base_url=url,
            api_key=secret or "EMPTY",
            max_retries=0,
            timeout=timeout_s,
            http_client=openai.DefaultAioHttpClient(timeout=timeout_s),
        )

    def __repr__(self) -> str:
        return f"SdkTransport(url={self.url!r})"

    async def post(self, body: dict[str, Any]) -> Any:
        if self._client is None:
            raise RuntimeError(f"the transport to {self.url} is closed")
        try:
            return await self._client.post("/chat/completions", cast_to=object, body=body)
        except Exception as exc:
            raise classify(
                exc,
                endpoint=self.url,
                secret=self._secret,
                key_source=self._key_source,
                timeout_s=self._timeout_s,
            ) from None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def open_transport(
    client: Client, url: str, *, secret: str | None, key_source: str, timeout_s: float
) -> Transport:
    """The transport named ``client`` to the endpoint at ``url``."""
    kind = AiohttpTransport if client == "aiohttp" else SdkTransport
    return kind(url, secret, key_source, timeout_s)


def _error_body(raw: bytes) -> object:
    """An error answer's body as the SDK reports it: the ``error`` object when there is one."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
    if isinstance(body, dict) and "error" in body:
        return body["error"]
    return body
