"""The server against requests that once broke it (issue 15, points 7, 10, 11, 12).

Unserved sizes, abandoned requests, a prompt that cannot be encoded, hostile images on /v1/images/edits,
oversized bodies and loosely typed fields: each gets a prompt 4xx in OpenAI's error envelope, and none of
them holds the workers or fails other clients' requests.
"""
from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from test_serve import API_KEY, PROMPT, ServerThread, build_tiny_pipeline  # the same tiny pipeline and server

from dalle3_fast.serve import ServeConfig, create_app
from dalle3_fast.serve.batching import Batcher, Job, stop_when
from dalle3_fast.serve.policy import Settings

pytestmark = pytest.mark.usefixtures("one_thread")
ENVELOPE = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))  # serves 64x64 (native), 96x64, 64x96


@pytest.fixture(scope="module")
def server(pipe):
    config = ServeConfig(model_name="tiny-random", api_key=API_KEY, batch_window_ms=20, timeout_s=60)
    with ServerThread(create_app(pipe, config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


def post(server, path, headers=None, **kw):
    headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=30, **kw)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE, body
    return body["error"]


class Gate:
    """A fake model run: records each batch's prompts, blocks until released, stops when told to."""

    def __init__(self):
        self.batches, self.release, self.started = [], threading.Event(), threading.Event()

    def __call__(self, jobs, should_stop):
        self.batches.append([p for j in jobs for p in j.prompts])
        self.started.set()
        stop = stop_when(should_stop)
        while not self.release.wait(0.01):
            stop()
        return [[Image.new("RGB", (j.settings.width, j.settings.height))] * j.count for j in jobs]


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ------------------------------------------------------------------ 7: sizes

def test_unserved_size_is_400_at_once_naming_the_served_sizes(client):
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt=PROMPT, size="1024x1024")  # OpenAI's default size
    assert time.monotonic() - started < 5
    assert info.value.body["param"] == "size"
    assert all(size in info.value.body["message"] for size in ("64x64", "96x64", "64x96"))
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("i.png", _rgba_png(64, 64), "image/png"), prompt=PROMPT, size="1024x1024")
    assert info.value.body["param"] == "size"


def test_served_sizes_are_listed_and_an_omitted_size_is_native(client, server):
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert all(m["sizes"] == ["64x64", "96x64", "64x96"] for m in models["data"])
    assert httpx.get(f"{server.url}/health").json()["sizes"] == ["64x64", "96x64", "64x96"]
    res = client.images.generate(prompt=PROMPT, response_format="b64_json")
    import base64
    assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).size == (64, 64)


def test_operator_sizes_replace_the_served_sizes(pipe):
    app = create_app(pipe, ServeConfig(sizes=["64x64", "128x128"]))
    gate = Gate()
    gate.release.set()
    app.state.batcher.run_batch = gate
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=30)
        client.images.generate(prompt=PROMPT, size="128x128")
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt=PROMPT, size="96x64")
        assert info.value.body["param"] == "size" and "128x128" in info.value.body["message"]
    with pytest.raises(ValueError, match="100x100"):
        create_app(pipe, ServeConfig(sizes=["64x64", "100x100"]))  # not a multiple of the U-Net's stride


def test_cli_sizes_flag(tmp_path, capsys, pipe):
    from dalle3_fast.serve.__main__ import build, main, parse_args

    pipe.save_pretrained(tmp_path / "p")
    _, config = build(parse_args(["--pipeline", str(tmp_path / "p"), "--sizes", "64x64,128x128"]))
    assert config.sizes == ["64x64", "128x128"]
    capsys.readouterr()
    for sizes, named in (("64x64,big", "'big'"), ("64x64,100x100", "100x100")):
        assert main(["--pipeline", str(tmp_path / "p"), "--sizes", sizes]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("error: --sizes") and named in errors[0], errors


def test_abandoned_requests_are_cancelled_and_free_the_worker(pipe):
    """A client that times out is gone: its running batch stops and its queued job is dropped, long before
    the server's own 60 s deadline, so the next client is served at once."""
    app = create_app(pipe, ServeConfig(max_batch=1, batch_window_ms=0, timeout_s=60))
    gate = Gate()
    app.state.batcher.run_batch = gate
    with ServerThread(app) as srv:
        url = f"{srv.url}/v1/images/generations"

        outcomes = []

        def abandon(prompt, patience):
            try:
                httpx.post(url, json={"prompt": prompt, "size": "64x64"}, timeout=patience)
                outcomes.append("answered")
            except httpx.ReadTimeout:
                outcomes.append("gave up")

        running = threading.Thread(target=abandon, args=("running", 3.0))
        running.start()
        assert gate.started.wait(10)
        queued = threading.Thread(target=abandon, args=("queued", 1.0))  # gives up while still queued
        queued.start()
        wait_until(lambda: app.state.batcher.depth == 1)
        queued.join()
        wait_until(lambda: app.state.batcher.depth == 0)
        assert gate.batches == [["running"]]
        running.join()
        assert outcomes == ["gave up", "gave up"]
        wait_until(lambda: app.state.metrics.snapshot()["cancelled"] == 2 and app.state.batcher.depth == 0)
        gate.release.set()
        started = time.monotonic()
        r = httpx.post(url, json={"prompt": "next", "size": "64x64"}, timeout=30)
        assert r.status_code == 200 and time.monotonic() - started < 5
    assert gate.batches == [["running"], ["next"]]  # the abandoned queued job never ran


# ------------------------------------------------------------------ 10: one bad request, one failure

@pytest.mark.parametrize("body", [
    json.dumps({"prompt": "a red \ud800 circle"}).encode(),            # JSON escape of an unpaired surrogate
    '{"prompt": "a red '.encode() + b"\xed\xa0\x80" + b' circle"}',    # the same as raw (invalid UTF-8) bytes
])
def test_prompt_that_is_not_utf8_is_400(server, body):
    r = post(server, "/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert error_of(r, 400)["param"] == "prompt"


def test_model_with_a_surrogate_is_404(server):
    r = post(server, "/v1/images/generations", content=json.dumps({"model": "x\ud800", "prompt": PROMPT}).encode(),
             headers={"content-type": "application/json"})
    error = error_of(r, 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"


def test_a_failing_job_fails_alone_and_its_batch_mates_succeed():
    calls = []

    def run_batch(jobs, should_stop):
        calls.append([j.prompts[0] for j in jobs])
        if any(j.prompts[0] == "bad" for j in jobs):
            raise ValueError("the tokenizer cannot encode this prompt")
        return [[j.prompts[0].upper()] for j in jobs]

    async def main():
        batcher = Batcher(run_batch, max_batch=8, window_s=0.3)
        batcher.start()
        try:
            loop = asyncio.get_running_loop()
            jobs = []
            for prompt in ("good", "bad", "fine"):
                job = Job("generate", Settings(64, 64, 2, 3.0, "dpmpp_2m", "vae", False), [prompt], [0],
                          deadline=time.monotonic() + 30)
                job.loop, job.future = loop, loop.create_future()
                batcher.submit(job)
                jobs.append(job)
            return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        finally:
            batcher.stop()

    good, bad, fine = asyncio.run(main())
    assert good == ["GOOD"] and fine == ["FINE"]
    assert isinstance(bad, ValueError)
    assert calls[0] == ["good", "bad", "fine"] and sorted(calls[1:]) == [["bad"], ["fine"], ["good"]]


# ------------------------------------------------------------------ 11: hostile images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width, height, *, color_type=6, before=b"", idat=None, after=b"") -> bytes:
    """A PNG built by hand; ``idat`` defaults to all-zero rows (transparent black for RGBA)."""
    if idat is None:
        channels = {6: 4, 2: 3, 3: 1}[color_type]
        idat = _chunk(b"IDAT", zlib.compress(bytes((1 + channels * width) * height)))
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
    return PNG_SIGNATURE + header + before + idat + after + _chunk(b"IEND", b"")


def _rgba_png(width, height) -> bytes:
    return _png(width, height)  # fully transparent: everything is to be edited


def _split_idat_with_a_corrupt_type() -> bytes:
    data = zlib.compress(bytes((1 + 4 * 64) * 64))
    half = len(data) // 2
    return _png(64, 64, idat=_chunk(b"IDAT", data[:half]) + _chunk(b"ID\x00T", data[half:]))


def _big_palette_png(side=10000) -> bytes:
    """A valid ~100 kB palette PNG of side x side pixels, index 0 transparent (so it is a valid edit input)."""
    compressor, row, parts = zlib.compressobj(9), bytes(1 + side), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    palette = _chunk(b"PLTE", bytes(3 * 2)) + _chunk(b"tRNS", b"\x00")
    return _png(side, side, color_type=3, before=palette, idat=_chunk(b"IDAT", b"".join(parts)))


HOSTILE = {
    "20000x20000": lambda: _png(20000, 20000, idat=_chunk(b"IDAT", zlib.compress(b"\0" * 64))),
    "2^31-1 pixels": lambda: _png(2 ** 31 - 1, 1, idat=_chunk(b"IDAT", zlib.compress(b"\0" * 64))),
    "corrupt chunk type": _split_idat_with_a_corrupt_type,
    "fcTL out of sequence": lambda: _png(64, 64, after=_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 5, 64, 64, 0, 0,
                                                                                    1, 1, 0, 0))),
    "iCCP unknown compression": lambda: _png(64, 64, after=_chunk(b"iCCP", b"icc\x00\x05" + zlib.compress(b"x"))),
    "truncated fcTL": lambda: _png(64, 64, before=_chunk(b"acTL", struct.pack(">II", 1, 0)) + _chunk(b"fcTL", b"\0")),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("param", ["image", "mask"])
def test_hostile_png_is_400_naming_the_part(server, case, param):
    files = {"image": ("i.png", _rgba_png(64, 64), "image/png"), "mask": ("m.png", _rgba_png(64, 64), "image/png"),
             param: ("x.png", HOSTILE[case](), "image/png")}
    r = post(server, "/v1/images/edits", files=files, data={"prompt": PROMPT})
    assert error_of(r, 400)["param"] == param


def test_png_that_pillow_reads_only_partly_is_not_a_500(server):
    """A palette PNG with tRNS but no PLTE: Pillow decodes it to RGBA but asserts converting it straight to RGB."""
    odd = _png(64, 64, color_type=3, before=_chunk(b"tRNS", b"\x00"))
    r = post(server, "/v1/images/edits", data={"prompt": PROMPT, "response_format": "b64_json"},
             files={"image": ("i.png", odd, "image/png"), "mask": ("m.png", _rgba_png(64, 64), "image/png")})
    assert r.status_code == 200, r.text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, on reading the header
def test_huge_valid_png_is_refused_before_decoding(server):
    data = _big_palette_png()
    assert len(data) < 200_000
    started = time.monotonic()
    r = post(server, "/v1/images/edits", files={"image": ("i.png", data, "image/png")}, data={"prompt": PROMPT})
    error = error_of(r, 400)
    assert error["param"] == "image" and "10000x10000" in error["message"]
    assert time.monotonic() - started < 2  # decoding it takes seconds and 1.4 GB; its header is enough


def test_images_are_decoded_off_the_event_loop(server, monkeypatch):
    opening, real_open = threading.Event(), Image.open

    def slow_open(*args, **kw):
        opening.set()
        time.sleep(1.5)
        return real_open(*args, **kw)

    monkeypatch.setattr(Image, "open", slow_open)
    edit = threading.Thread(target=post, args=(server, "/v1/images/edits"),
                            kwargs={"files": {"image": ("i.png", _rgba_png(64, 64), "image/png")},
                                    "data": {"prompt": PROMPT}})
    edit.start()
    try:
        assert opening.wait(10)
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 0.75, "/health waited for an image to be decoded"
    finally:
        edit.join()


# ------------------------------------------------------------------ 12: request limits

def _raw_request(port: int, head: bytes, timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_huge_content_length_is_413_without_waiting_for_the_body(server):
    head = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 18446744073709551616\r\n\r\n")
    started = time.monotonic()
    reply = _raw_request(server.port, head)
    assert time.monotonic() - started < 5
    status, _, rest = reply.partition(b"\r\n")
    assert status.split()[1] == b"413", reply[:200]
    assert set(json.loads(rest.partition(b"\r\n\r\n")[2])["error"]) == ENVELOPE


def test_oversized_json_body_is_413(server):
    body = json.dumps({"prompt": PROMPT, "padding": "x" * (20 * 2 ** 20)}).encode()
    assert error_of(post(server, "/v1/images/generations", content=body,
                         headers={"content-type": "application/json"}), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "x", "padding": "'
        for _ in range(40):
            yield b"x" * 2 ** 16
        yield b'"}'

    error_of(post(server, "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}),
             413)


def test_oversized_edit_upload_is_413_and_the_caps_are_configurable(pipe, server):
    big = _rgba_png(64, 64) + bytes(12 * 2 ** 20)
    r = post(server, "/v1/images/edits", files={"image": ("i.png", big, "image/png")}, data={"prompt": PROMPT})
    error_of(r, 413)
    app = create_app(pipe, ServeConfig(max_json_bytes=1000, max_image_bytes=20_000))
    with ServerThread(app) as srv:
        r = httpx.post(f"{srv.url}/v1/images/generations", json={"prompt": "x" * 2000})
        error_of(r, 413)
        r = httpx.post(f"{srv.url}/v1/images/edits", data={"prompt": PROMPT},
                       files={"image": ("i.png", _rgba_png(64, 64) + bytes(60_000), "image/png")})
        error_of(r, 413)


@pytest.mark.parametrize("fields, param", [
    ({"n": True}, "n"), ({"n": "2"}, "n"), ({"n": 2.0}, "n"), ({"n": None, "size": 64}, "size"),
    ({"model": 3}, "model"), ({"response_format": ["url"]}, "response_format"), ({"user": 7}, "user"),
    ({"quality": False}, "quality"),
])
def test_field_types_are_strict(server, fields, param):
    body = {"prompt": PROMPT, "size": "64x64", **fields}
    error = error_of(post(server, "/v1/images/generations", json=body), 400)
    assert error["param"] == param and error["code"] == "invalid_type", error


@pytest.mark.parametrize("n", ["2.0", "true", " 2", "1e0"])
def test_edit_form_n_must_be_a_decimal_integer(server, n):
    r = post(server, "/v1/images/edits", files={"image": ("i.png", _rgba_png(64, 64), "image/png")},
             data={"prompt": PROMPT, "n": n})
    assert error_of(r, 400)["param"] == "n"


def test_edit_form_n_as_sent_by_the_openai_client(client):
    res = client.images.edit(image=("i.png", _rgba_png(64, 64), "image/png"), prompt=PROMPT, n=2,
                             response_format="b64_json")
    assert len(res.data) == 2


def test_cli_body_caps(tmp_path, capsys, pipe):
    from dalle3_fast.serve.__main__ import build, main, parse_args

    pipe.save_pretrained(tmp_path / "p")
    _, config = build(parse_args(["--pipeline", str(tmp_path / "p"), "--max-json-mb", "0.5",
                                  "--max-image-mb", "2"]))
    assert config.max_json_bytes == 2 ** 19 and config.max_image_bytes == 2 * 2 ** 20
    capsys.readouterr()
    assert main(["--pipeline", str(tmp_path / "p"), "--max-image-mb", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-image-mb must be > 0, got 0\n"


def test_valid_requests_still_work_after_all_of_this(client):
    res = client.images.generate(prompt=PROMPT, n=2, size="96x64", response_format="b64_json")
    assert len(res.data) == 2
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[..., 3] = 255
    arr[:16, :16, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    res = client.images.edit(image=("i.png", buf.getvalue(), "image/png"), prompt=PROMPT, response_format="url")
    assert res.data[0].url.endswith(".png")
