"""The bytes behind an OpenAI `image_url`: a `data:` URL, or, only where the server allows it
(`serve --allow-image-urls`), an http(s) download with a size limit, a timeout and no address that is not
public (loopback, private, link-local, reserved: the server must not become a way into its own network). A local
path or any other scheme is never read."""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from qwenlite.errors import InvalidImage
from qwenlite.io.images import data_url_bytes

MAX_IMAGE_BYTES = 20 << 20  # per image, after base64 decoding or as downloaded
MAX_VIDEO_BYTES = 64 << 20  # per video (`video_url` parts read the same way, with `kind="video"`)
DOWNLOAD_TIMEOUT = 10.0  # seconds, per socket operation


def image_bytes(url: str, allow_urls: bool = False, max_bytes: int | None = None, kind: str = "image") -> bytes:
    """The image (or video, `kind`) behind `url`, at most `max_bytes` (default MAX_IMAGE_BYTES) of it."""
    max_bytes = max_bytes or MAX_IMAGE_BYTES
    a = "a" if kind == "video" else "an"
    if url.startswith("data:"):
        return data_url_bytes(url, max_bytes, kind)
    if url.startswith(("http://", "https://")):
        if not allow_urls:
            raise InvalidImage(f"this server reads no {kind} URLs (serve --allow-image-urls); send a data: URL")
        return download(url, max_bytes)
    raise InvalidImage(f"{a} {kind}_url must be a data: URL (or http(s) where allowed); local paths are never read")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_public(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def check_public(url: str) -> None:
    """Refuse a URL whose host resolves to any address that is not globally routable."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidImage(f"cannot download {url!r}: not an http(s) URL")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        raise InvalidImage(f"cannot resolve the image URL's host {parts.hostname!r}: {e}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise InvalidImage(f"the image URL's host {parts.hostname!r} is on a private or local network")


def download(url: str, max_bytes: int) -> bytes:
    check_public(url)
    opener = urllib.request.build_opener(_CheckedRedirects)
    try:
        with opener.open(
            urllib.request.Request(url, headers={"User-Agent": "qwenlite"}), timeout=DOWNLOAD_TIMEOUT
        ) as r:
            data = r.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InvalidImage(f"cannot download the image at {url}: {getattr(e, 'reason', e)}") from None
    if len(data) > max_bytes:
        raise InvalidImage(f"the image at {url} is larger than this server's {max_bytes} bytes")
    return data
