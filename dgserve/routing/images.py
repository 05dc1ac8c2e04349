"""The image bytes of OpenAI chat ``image_url`` content parts: ``data:`` URLs (base64 PNG/JPEG/WebP) always;
``http(s)`` URLs only when the operator enables fetching with an allow-list of hosts, a size cap and a timeout
(off by default: a server that fetches any URL it is given is an SSRF hole); every other scheme refused.
Errors name the content part and say what was wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from dgserve.config import ImageFetchSettings
from dgserve.model.image_processing import ACCEPTED_FORMATS, ImageInputError, ImageTooLargeError

log = logging.getLogger(__name__)

# Media types a data: URL may declare; the bytes are identified by their content either way.
_IMAGE_MEDIA_TYPES = {*ACCEPTED_FORMATS.values(), "image/jpg"}
_UNTYPED = {"", "application/octet-stream"}


class ImageURLError(ImageInputError):
    """An ``image_url`` that cannot be turned into image bytes (bad data: URL, refused or failed fetch)."""


@dataclass(frozen=True)
class ImageURL:
    """One ``image_url`` content part of a request, with where it sits (for error messages)."""

    url: str
    where: str  # e.g. "messages[0].content[1]"


def decode_data_url(image: ImageURL, max_bytes: int) -> bytes:
    """The bytes of a ``data:<image type>;base64,<data>`` URL (the size is checked before decoding)."""
    header, sep, payload = image.url.partition(",")
    if not sep:
        raise ImageURLError(f"{image.where}: malformed data: URL (no ',' before the data)")
    params = header[len("data:"):].split(";")
    media_type = params[0].strip().lower()
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageURLError(f"{image.where}: data: URLs must be base64-encoded (data:image/png;base64,...)")
    if media_type not in _IMAGE_MEDIA_TYPES and media_type not in _UNTYPED:
        raise ImageURLError(f"{image.where}: data: URL of type {media_type!r}; accepted are image/png, image/jpeg "
                            "and image/webp")
    encoded = "".join(payload.split())  # MIME-style line breaks are allowed
    if len(encoded) // 4 * 3 > max_bytes + 2:
        raise ImageTooLargeError(f"{image.where}: the image is about {len(encoded) // 4 * 3} bytes; the limit is "
                                 f"{max_bytes} bytes (max_bytes)")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageURLError(f"{image.where}: the data: URL's base64 data is invalid ({exc})") from exc


async def load_image_bytes(image: ImageURL, fetch: ImageFetchSettings, max_bytes: int,
                           client: httpx.AsyncClient | None = None) -> bytes:
    """The bytes behind an ``image_url``: decoded from a data: URL, or fetched under ``fetch``'s rules."""
    scheme = image.url.split(":", 1)[0].lower() if ":" in image.url else ""
    if scheme == "data":
        return decode_data_url(image, max_bytes)
    if scheme in ("http", "https"):
        if not fetch.enabled:
            raise ImageURLError(
                f"{image.where}: this server does not fetch image URLs (off by default: fetching arbitrary URLs is "
                "a server-side request forgery risk); send the image inline as a data:image/...;base64 URL, or "
                "ask the operator to enable image URL fetching with an allow-list of hosts")
        return await _fetch(image, fetch, min(max_bytes, fetch.max_bytes), client)
    shown = f"{scheme}:" if scheme else repr(image.url[:40])
    raise ImageURLError(f"{image.where}: {shown} image URLs are not accepted; send a data:image/...;base64 URL"
                        f"{' (or an http(s) URL of an allowed host)' if fetch.enabled else ''}")


async def _fetch(image: ImageURL, fetch: ImageFetchSettings, max_bytes: int,
                 client: httpx.AsyncClient | None) -> bytes:
    own = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        async with asyncio.timeout(fetch.timeout_s):
            return await _fetch_following(image, fetch, max_bytes, client)
    except TimeoutError as exc:
        raise ImageURLError(f"{image.where}: fetching the image took longer than {fetch.timeout_s:g} s "
                            "(the server's image fetch timeout)") from exc
    except httpx.HTTPError as exc:
        raise ImageURLError(f"{image.where}: fetching the image failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            await client.aclose()


async def _fetch_following(image: ImageURL, fetch: ImageFetchSettings, max_bytes: int,
                           client: httpx.AsyncClient) -> bytes:
    url = image.url
    for _ in range(fetch.max_redirects + 1):
        _check_allowed(url, image.where, fetch)
        async with client.stream("GET", url, headers={"Accept": "image/png, image/jpeg, image/webp"}) as response:
            if response.is_redirect:
                location = response.headers.get("location")
                if not location:
                    raise ImageURLError(f"{image.where}: {url} redirected without a location")
                url = urljoin(url, location)
                continue
            if response.status_code != 200:
                raise ImageURLError(f"{image.where}: fetching {url} returned HTTP {response.status_code}")
            media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not media_type.startswith("image/") and media_type not in _UNTYPED:
                raise ImageURLError(f"{image.where}: {url} returned {media_type!r}, not an image")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageTooLargeError(f"{image.where}: the image at {url} is {declared} bytes; the limit is "
                                         f"{max_bytes} bytes (max_bytes)")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ImageTooLargeError(f"{image.where}: the image at {url} is more than {max_bytes} bytes "
                                             "(max_bytes)")
            return bytes(body)
    raise ImageURLError(f"{image.where}: more than {fetch.max_redirects} redirects fetching {image.url}")


def _check_allowed(url: str, where: str, fetch: ImageFetchSettings) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageURLError(f"{where}: {parts.scheme or 'a relative'} URL refused (only http(s) is fetched)")
    if parts.username is not None or parts.password is not None:
        raise ImageURLError(f"{where}: image URLs with credentials are refused")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ImageURLError(f"{where}: malformed URL {url!r} ({exc})") from exc
    host = parts.hostname or ""
    if not fetch.allows(host, port):
        raise ImageURLError(f"{where}: host {host}:{port} is not in the server's allow-list for image URLs")


__all__ = ["ImageURL", "ImageURLError", "decode_data_url", "load_image_bytes"]
