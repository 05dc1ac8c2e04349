"""image_url content parts: data: URLs, the http(s) fetch policy (off by default; allow-listed hosts, size cap,
timeout, redirects), refused schemes; fetches go to a real HTTP server on 127.0.0.1 (pytest-httpserver)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import pytest
from PIL import Image
from werkzeug import Response

from dgserve.config import ImageFetchSettings
from dgserve.model.image_processing import ImageLimits, ImageTooLargeError, decode_image
from dgserve.routing.images import ImageURL, ImageURLError, load_image_bytes

MAX = 100_000


def png_bytes(width: int = 12, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def load(url: str, fetch: ImageFetchSettings | None = None, max_bytes: int = MAX) -> bytes:
    return asyncio.run(load_image_bytes(ImageURL(url, "messages[0].content[1]"), fetch or ImageFetchSettings(),
                                        max_bytes))


def allowing(httpserver, **kwargs) -> ImageFetchSettings:
    return ImageFetchSettings(enabled=True, allowed_hosts=[f"127.0.0.1:{httpserver.port}"], **kwargs)


def url(httpserver, path: str, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{httpserver.port}{path}"


# -- data: URLs


@pytest.mark.parametrize("media_type", ["image/png", "image/jpeg", "image/webp", "image/jpg", "IMAGE/PNG"])
def test_data_urls_of_image_types(media_type):
    data = png_bytes()
    assert load(data_url(data, media_type)) == data  # the bytes are identified by content when decoded


def test_data_url_with_line_breaks():
    encoded = base64.encodebytes(png_bytes(200, 100)).decode()  # MIME base64: a newline every 76 characters
    assert "\n" in encoded
    assert load(f"data:image/png;base64,{encoded}") == png_bytes(200, 100)


@pytest.mark.parametrize(("url", "message"), [
    ("data:image/png;base64,@@@not-base64@@@", r"messages\[0\]\.content\[1\]: the data: URL's base64 data is invalid"),
    ("data:image/png,rawbytes", "must be base64-encoded"),
    ("data:text/plain;base64,aGVsbG8=", "data: URL of type 'text/plain'; accepted are image/png, image/jpeg and "
     "image/webp"),
    ("data:image/png;base64", r"malformed data: URL \(no ',' before the data\)"),
])
def test_bad_data_urls(url, message):
    with pytest.raises(ImageURLError, match=message):
        load(url)


def test_data_url_size_is_checked_before_decoding():
    with pytest.raises(ImageTooLargeError, match=r"the limit is 1000 bytes \(max_bytes\)"):
        load(data_url(b"x" * 5000), max_bytes=1000)


@pytest.mark.parametrize(("url", "message"), [
    ("file:///etc/passwd", "file: image URLs are not accepted"),
    ("ftp://example.com/a.png", "ftp: image URLs are not accepted"),
    ("javascript:alert(1)", "javascript: image URLs are not accepted"),
    ("/relative/image.png", "'/relative/image.png' image URLs are not accepted"),
])
def test_other_schemes_are_refused(url, message):
    with pytest.raises(ImageURLError, match=message):
        load(url, ImageFetchSettings(enabled=True, allowed_hosts=["example.com"]))


# -- http(s): the fetch policy


def test_http_urls_are_not_fetched_by_default(httpserver):
    httpserver.expect_request("/a.png").respond_with_data(png_bytes(), content_type="image/png")
    with pytest.raises(ImageURLError, match=r"does not fetch image URLs .* ask the operator to enable"):
        load(url(httpserver, "/a.png"))
    assert not httpserver.log  # nothing was requested


def test_allow_listed_host_is_fetched(httpserver):
    data = png_bytes(30, 20)
    httpserver.expect_request("/a.png").respond_with_data(data, content_type="image/png")
    fetched = load(url(httpserver, "/a.png"), allowing(httpserver))
    assert fetched == data
    assert decode_image(fetched, ImageLimits()).size == (30, 20)
    # a bare host entry allows any port; other hosts are refused before any connection
    assert load(url(httpserver, "/a.png"), ImageFetchSettings(enabled=True, allowed_hosts=["127.0.0.1"])) == data
    with pytest.raises(ImageURLError, match=r"host localhost:\d+ is not in the server's allow-list"):
        load(url(httpserver, "/a.png", host="localhost"), allowing(httpserver))
    with pytest.raises(ImageURLError, match="is not in the server's allow-list"):
        load(url(httpserver, "/a.png"), ImageFetchSettings(enabled=True, allowed_hosts=["127.0.0.1:1"]))


def test_wildcard_and_ipv6_entries():
    fetch = ImageFetchSettings(enabled=True, allowed_hosts=["*.Example.com", "[::1]:8080", "images.test:443"])
    assert fetch.allows("cdn.example.com", 443) and fetch.allows("a.b.example.com", 80)
    assert not fetch.allows("example.com", 443) and not fetch.allows("badexample.com", 443)
    assert fetch.allows("::1", 8080) and not fetch.allows("::1", 8081)
    assert fetch.allows("images.test", 443) and not fetch.allows("images.test", 80)
    with pytest.raises(ValueError, match="expected host, host:port or"):
        ImageFetchSettings(allowed_hosts=["http://example.com"])
    with pytest.raises(ValueError, match="bad port"):
        ImageFetchSettings(allowed_hosts=["example.com:99999"])


def test_redirects_are_checked_against_the_allow_list(httpserver):
    data = png_bytes()
    httpserver.expect_request("/img").respond_with_data(data, content_type="image/png")
    httpserver.expect_request("/hop").respond_with_response(Response(status=302, headers={"Location": "/img"}))
    httpserver.expect_request("/away").respond_with_response(
        Response(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data"}))
    httpserver.expect_request("/loop").respond_with_response(Response(status=302, headers={"Location": "/loop"}))
    assert load(url(httpserver, "/hop"), allowing(httpserver)) == data
    with pytest.raises(ImageURLError, match=r"host 169\.254\.169\.254:80 is not in the server's allow-list"):
        load(url(httpserver, "/away"), allowing(httpserver))
    with pytest.raises(ImageURLError, match="more than 2 redirects"):
        load(url(httpserver, "/loop"), allowing(httpserver, max_redirects=2))


def test_failed_fetches_say_why(httpserver):
    httpserver.expect_request("/missing").respond_with_data("no", status=404)
    httpserver.expect_request("/page").respond_with_data("<html></html>", content_type="text/html")
    with pytest.raises(ImageURLError, match=r"returned HTTP 404"):
        load(url(httpserver, "/missing"), allowing(httpserver))
    with pytest.raises(ImageURLError, match=r"returned 'text/html', not an image"):
        load(url(httpserver, "/page"), allowing(httpserver))
    port = httpserver.port
    httpserver.stop()  # nothing listens any more
    try:
        with pytest.raises(ImageURLError, match="fetching the image failed: ConnectError"):
            load(f"http://127.0.0.1:{port}/a.png", ImageFetchSettings(enabled=True, allowed_hosts=["127.0.0.1"]))
    finally:
        httpserver.start()


def test_size_cap_with_and_without_content_length(httpserver):
    big = b"\x89PNG" + b"\x00" * 5000
    httpserver.expect_request("/big").respond_with_data(big, content_type="image/png")

    def chunked(_request):
        return Response((b"\x00" * 1000 for _ in range(10)), content_type="image/png")  # no Content-Length

    httpserver.expect_request("/stream").respond_with_handler(chunked)
    with pytest.raises(ImageTooLargeError, match=r"is 5004 bytes; the limit is 1000 bytes \(max_bytes\)"):
        load(url(httpserver, "/big"), allowing(httpserver, max_bytes=1000))
    with pytest.raises(ImageTooLargeError, match=r"more than 2000 bytes \(max_bytes\)"):
        load(url(httpserver, "/stream"), allowing(httpserver), max_bytes=2000)


def test_slow_server_times_out(httpserver):
    release = threading.Event()

    def slow(_request):
        release.wait(5)
        return Response(png_bytes(), content_type="image/png")

    httpserver.expect_request("/slow").respond_with_handler(slow)
    try:
        with pytest.raises(ImageURLError, match=r"took longer than 0\.3 s"):
            load(url(httpserver, "/slow"), allowing(httpserver, timeout_s=0.3))
        assert not release.is_set()  # ended by our deadline while the server was still holding the answer
    finally:
        release.set()


def test_credentials_in_url_are_refused(httpserver):
    with_credentials = url(httpserver, "/a.png").replace("http://", "http://user:secret@")
    with pytest.raises(ImageURLError, match="with credentials are refused"):
        load(with_credentials, allowing(httpserver))
