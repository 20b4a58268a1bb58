"""server/multipart.py finds the same file fields as Starlette's form parser, and refuses what is malformed."""
import asyncio

import httpx
import pytest

pytest.importorskip("python_multipart", reason="the server extra is not installed")
from starlette.requests import Request  # noqa: E402

from server.multipart import MultipartError, file_fields  # noqa: E402


def _starlette_files(body: bytes, ctype: str) -> list[bytes]:
    async def main():
        sent = False

        async def receive():
            nonlocal sent
            sent, was = True, sent
            return {"type": "http.disconnect"} if was else {"type": "http.request", "body": body, "more_body": False}
        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"content-type", ctype.encode())]}
        form = await Request(scope, receive).form()
        return [await f.read() for f in form.getlist("file") if hasattr(f, "read")]
    return asyncio.run(main())


def _encoded(**kw) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", **kw)
    return request.read(), request.headers["content-type"]


@pytest.mark.parametrize("kw", [
    dict(files=[("file", ("a.png", b"\x89PNG one"))]),
    dict(files=[("file", ("a.png", b"first\r\n--not the boundary\r\n")), ("file", ("b.png", b"")),
                ("other", ("c.png", b"not a file field")), ("file", ("d d.png", bytes(range(256)) * 40))],
         data={"file": "a text field, not a file", "x": "1"}),
])
def test_the_same_file_fields_as_starlette(kw):
    body, ctype = _encoded(**kw)
    assert file_fields(body, ctype) == _starlette_files(body, ctype)


def test_preamble_padding_and_epilogue_are_allowed():
    body = (b"preamble\r\n--b  \r\ncontent-disposition: form-data; name=file; filename=x\r\n\r\none\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"y\"\r\nContent-Type: image/png\r\n\r\n"
            b"two\r\n--b--\r\nepilogue")
    assert file_fields(body, "multipart/form-data; boundary=b") == [b"one", b"two"]


@pytest.mark.parametrize("body,ctype", [
    (b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\ndata", "multipart/form-data; boundary=b"),
    (b"no boundary at all", "multipart/form-data; boundary=b"),
    (b"--b\r\nno blank line after the headers", "multipart/form-data; boundary=b"),
    (b"--b\r\nnot a header\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b"),
    (b"--b--", "multipart/form-data"),
    (b"".join(b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\nx\r\n" for _ in range(1001)) + b"--b--",
     "multipart/form-data; boundary=b"),
])
def test_malformed_bodies_are_a_400(body, ctype):
    with pytest.raises(MultipartError):
        file_fields(body, ctype)
