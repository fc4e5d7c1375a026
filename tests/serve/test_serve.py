"""The OpenAI-compatible server, driven by the official ``openai`` client over loopback against a tiny pipeline."""
from __future__ import annotations

import base64
import io
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
from PIL import Image

from dalle3_fast.serve import ServeConfig, create_app
from dalle3_fast.serve.batching import Batcher, Job, JobCancelled, QueueFull
from dalle3_fast.serve.policy import Blocklist, Settings

API_KEY = "sk-test-key"
PROMPT = "a red circle above a blue square"


def build_tiny_pipeline(directory):
    """A random-init pipeline (tiny T5, U-Net, VAE, latent decoder) saved with save_pretrained."""
    from dalle3_fast.models.latent_decoder import LatentDecoder
    from dalle3_fast.models.text_encoder import T5TextEncoder
    from dalle3_fast.models.tokenizer import SentencePieceTokenizer
    from dalle3_fast.models.unet import UNet
    from dalle3_fast.models.vae import AutoencoderKL
    from dalle3_fast.pipeline import Dalle3Pipeline

    words = "a an the red blue green yellow circle square triangle above below left right of on background".split()
    rng = random.Random(0)
    tokenizer = SentencePieceTokenizer.train([" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)],
                                             vocab_size=64)
    torch.manual_seed(0)
    pipe = Dalle3Pipeline(T5TextEncoder.tiny(tokenizer, d_model=64, num_layers=1, num_heads=2, max_tokens=32, seed=0),
                          UNet("tiny"), AutoencoderKL("tiny"), decoder=LatentDecoder("tiny"),
                          defaults={"size": "64x64", "steps": 2, "guidance": 3.0}, sizes=["64x64", "96x64", "64x96"])
    pipe.save_pretrained(directory)
    return Dalle3Pipeline.from_pretrained(directory)


class ServerThread:
    """uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    blocklist = tmp_path_factory.mktemp("policy") / "blocklist.txt"
    blocklist.write_text("# blocked terms\nforbidden\nbad word\n")
    config = ServeConfig(model_name="tiny-random", max_batch=8, max_queue=64, batch_window_ms=50, api_key=API_KEY,
                         blocklist=Blocklist.from_file(blocklist), timeout_s=60)
    with ServerThread(create_app(pipe, config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def post(server, path, headers=None, **kw):
    headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=60, **kw)


# ------------------------------------------------------------------ generations

@pytest.mark.parametrize("size", ["64x64", "96x64"])
def test_generation_b64_png_of_requested_size(client, size):
    res = client.images.generate(model="dall-e-3", prompt=PROMPT, n=2, size=size, response_format="b64_json",
                                 quality="standard", style="vivid", user="test")
    assert len(res.data) == 2 and res.created > 0
    w, h = map(int, size.split("x"))
    images = [png(d.b64_json) for d in res.data]
    assert all(im.size == (w, h) and im.mode == "RGB" for im in images)
    assert res.data[0].revised_prompt == PROMPT  # no upsampler in this pipeline: the prompt is unchanged
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1])), "n images must use different seeds"


def test_generation_url_is_served_by_the_same_server(client):
    res = client.images.generate(model="tiny-random", prompt=PROMPT, size="64x96", response_format="url",
                                 quality="hd", style="natural")
    url = res.data[0].url
    assert url.startswith("http://127.0.0.1:") and url.endswith(".png")
    got = httpx.get(url, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 96)
    missing = httpx.get(url.replace("/files/", "/files/x"), timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"


def test_url_expires_after_ttl(pipe):
    app = create_app(pipe, ServeConfig(url_ttl_s=2.0))  # not less: a loaded 2-core box takes >0.2 s to fetch
    with ServerThread(app) as srv:
        url = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0).images.generate(
            prompt=PROMPT, size="64x64").data[0].url
        assert httpx.get(url).status_code == 200
        time.sleep(2.1)
        assert httpx.get(url).status_code == 404


# ------------------------------------------------------------------ edits

def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _picture(alpha_hole: bool) -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    arr[..., 3] = 255
    if alpha_hole:
        arr[16:48, 16:48, 3] = 0
    return Image.fromarray(arr, "RGBA")


def test_edit_with_alpha_and_with_mask(client):
    res = client.images.edit(image=("img.png", _png_bytes(_picture(True)), "image/png"), prompt="a green triangle",
                             n=2, size="64x64", response_format="b64_json")
    assert len(res.data) == 2 and all(png(d.b64_json).size == (64, 64) for d in res.data)
    mask = np.full((64, 64, 4), 255, dtype=np.uint8)
    mask[:32, :, 3] = 0
    res = client.images.edit(image=("img.png", _png_bytes(_picture(False).convert("RGB")), "image/png"),
                             mask=("mask.png", _png_bytes(Image.fromarray(mask, "RGBA")), "image/png"),
                             prompt="a green triangle", response_format="b64_json")
    assert png(res.data[0].b64_json).size == (64, 64)  # default size: the image's own


def test_edit_keeps_the_known_region_in_latent_space(pipe):
    from dalle3_fast.serve.runner import PipelineRunner

    runner = PipelineRunner(pipe)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 3:9, 20:30] = 1  # pixels -> latent cells rows 0-1, cols 2-3 (8x8 cells, max-pooled)
    known, latent_mask = runner.encode_edits(images, masks)
    want = torch.zeros(1, 1, 8, 8)
    want[..., 0:2, 2:4] = 1
    assert torch.equal(latent_mask, want)
    latents = pipe.generate_latents(["a green triangle"], width=64, height=64, steps=2, guidance=3.0, seeds=[0],
                                    init_latents=known, mask=latent_mask)
    keep = latent_mask.expand_as(latents) == 0
    torch.testing.assert_close(latents[keep], known[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents[~keep], known[~keep], atol=1e-3)


def test_edit_errors_name_the_param(server):
    opaque = _png_bytes(_picture(False))
    r = post(server, "/v1/images/edits", files={"image": ("i.png", opaque, "image/png")}, data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = post(server, "/v1/images/edits", files={"image": ("i.png", b"not a png", "image/png")}, data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    small_mask = _png_bytes(Image.new("RGBA", (32, 32)))
    r = post(server, "/v1/images/edits", data={"prompt": "x"},
             files={"image": ("i.png", opaque, "image/png"), "mask": ("m.png", small_mask, "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = post(server, "/v1/images/edits", files={"image": ("i.png", _png_bytes(_picture(True)), "image/png")},
             data={"prompt": "x" * 1001})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, "/v1/images/edits", data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("fields, param", [
    ({"n": 0}, "n"), ({"n": 11}, "n"), ({"size": "100x100"}, "size"), ({"size": "big"}, "size"),
    ({"quality": "ultra"}, "quality"), ({"style": "cartoon"}, "style"),
    ({"response_format": "jpeg"}, "response_format"),
    ({"prompt": "x" * 4001}, "prompt"), ({"prompt": "   "}, "prompt"),
])
def test_invalid_fields_are_400_naming_the_param(client, fields, param):
    args = {"prompt": PROMPT, "size": "64x64", **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(**args)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param and info.value.body["type"] == "invalid_request_error"


def test_framework_validation_errors_use_the_envelope(server):
    for body, param in (({"prompt": PROMPT, "n": "many"}, "n"), ({"size": "64x64"}, "prompt"),
                        ({"prompt": ["a", "b"]}, "prompt")):
        r = post(server, "/v1/images/generations", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = post(server, "/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{server.url}/v1/nowhere", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="gpt-image-9", prompt=PROMPT)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.images.generate(prompt=PROMPT)
    assert info.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics need no key


def test_blocklist_is_a_case_insensitive_word_match(client):
    for prompt in ("a FORBIDDEN square", "the Bad  Word", "forbidden"):
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt=prompt.replace("  ", " "), size="64x64")
        assert info.value.body["code"] == "content_policy_violation"
    blocklist = Blocklist(["forbidden", "bad word"])
    assert blocklist.match("unforbiddenly bad words") is None  # inside other words: allowed
    assert blocklist.match("is it forbidden?") == "forbidden"


def test_models_health_metrics(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids == ["dall-e-3", "dall-e-2", "tiny-random"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and "64x64" in health["sizes"]
    text = httpx.get(f"{server.url}/metrics", params={"format": "prometheus"}).text
    assert "dalle3_batch_size_bucket{le=\"+Inf\"}" in text and "dalle3_queue_depth" in text


# ------------------------------------------------------------------ batching

def test_fifty_concurrent_requests_are_batched(client, server):
    before = httpx.get(f"{server.url}/metrics").json()

    def one(i):
        return client.images.generate(prompt=f"{PROMPT} {i}", size="64x64", response_format="b64_json")

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert all(len(r.data) == 1 and png(r.data[0].b64_json).size == (64, 64) for r in results)
    after = httpx.get(f"{server.url}/metrics").json()
    assert after["images"] - before["images"] == 50
    assert after["batches"] - before["batches"] < 50, "requests were not batched"
    assert after["max_batch_size"] > 1 and after["latency_s"]["p99"] is not None
    assert after["queue_depth"] == 0


def test_batched_images_equal_single_calls(pipe):
    """Per-image seeds: an image does not depend on what it was batched with."""
    from dalle3_fast.serve.runner import PipelineRunner

    settings = Settings(64, 64, 2, 3.0, pipe.defaults["sampler"], "vae", upsample=False)
    jobs = [Job("generate", settings, [p], [s], deadline=1e18) for p, s in (("a red circle", 1), ("a blue square", 2))]
    runner = PipelineRunner(pipe)
    together = runner(jobs, lambda: False)
    alone = [runner([job], lambda: False)[0] for job in jobs]
    for a, b in zip(together, alone):
        assert np.abs(np.asarray(a[0], np.int16) - np.asarray(b[0], np.int16)).max() <= 1


class GatedRunner:
    """A fake model: records batches and blocks until released."""

    def __init__(self):
        self.batches, self.release, self.started = [], threading.Event(), threading.Event()

    def __call__(self, jobs, should_stop):
        self.batches.append([j.prompts[0] for j in jobs])
        self.started.set()
        while not self.release.wait(0.01):
            if should_stop():
                raise JobCancelled("stopped")
        return [[j.prompts[0]] * j.count for j in jobs]


def _job(prompt, size=64, deadline=60.0):
    settings = Settings(size, size, 2, 3.0, "dpmpp_2m", "vae", upsample=False)
    return Job("generate", settings, [prompt], [0], deadline=time.monotonic() + deadline)


def test_batcher_groups_by_settings_bounds_queue_and_cancels():
    runner = GatedRunner()
    batcher = Batcher(runner, max_batch=3, max_queue=4, window_s=0.05)
    batcher.start()
    try:
        batcher.submit(_job("blocker"))
        assert runner.started.wait(5)
        jobs = [_job("a"), _job("b", size=96), _job("c"), _job("d")]
        for job in jobs:
            batcher.submit(job)
        with pytest.raises(QueueFull):
            batcher.submit(_job("e"))
        batcher.cancel(jobs[3])  # cancelled while queued: removed, never runs
        assert batcher.depth == 3
        runner.release.set()
        deadline = time.monotonic() + 5
        while batcher.depth or len(runner.batches) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert runner.batches == [["blocker"], ["a", "c"], ["b"]]
    finally:
        batcher.stop()


def test_batcher_drops_expired_jobs_and_stops_cancelled_batches():
    runner = GatedRunner()
    batcher = Batcher(runner, max_batch=2, max_queue=8, window_s=0.0)
    batcher.start()
    try:
        running = _job("running")
        batcher.submit(running)
        assert runner.started.wait(5)
        expired = _job("expired", deadline=0.01)
        batcher.submit(expired)
        time.sleep(0.05)
        batcher.cancel(running)  # every job of the running batch cancelled: the batch stops
        deadline = time.monotonic() + 5
        while batcher.depth:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
        assert runner.batches == [["running"]] and expired.cancelled
        assert batcher.metrics.snapshot()["images"] == 0
    finally:
        runner.release.set()
        batcher.stop()


def test_queue_full_is_429_and_timeout_is_504(pipe):
    app = create_app(pipe, ServeConfig(max_batch=1, max_queue=1, batch_window_ms=0, timeout_s=1.5))
    gate = GatedRunner()
    real = app.state.batcher.run_batch
    app.state.batcher.run_batch = lambda jobs, stop: (gate(jobs, stop), real(jobs, stop))[1]
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=30)

        def one(_):
            try:
                client.images.generate(prompt=PROMPT, size="64x64")
                return 200, None
            except openai.APIStatusError as exc:
                return exc.status_code, exc.response.headers.get("retry-after")

        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(one, 0)
            assert gate.started.wait(10)
            codes = list(pool.map(one, range(3)))  # one waits in the queue, two find it full
        assert sorted(c for c, _ in codes).count(429) == 2
        assert all(int(retry) >= 1 for c, retry in codes if c == 429)
        assert first.result()[0] == 504 and 504 in [c for c, _ in codes]  # the gate never opened: both time out
        metrics = httpx.get(f"{srv.url}/metrics").json()
        assert metrics["cancelled"] >= 2 and metrics["images"] == 0
        gate.release.set()


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, pipe):
    from dalle3_fast.serve.__main__ import main

    assert main(["--pipeline", str(tmp_path / "missing")]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    pipe.save_pretrained(tmp_path / "p")
    monkeypatch.delenv("DALLE3_TEST_KEY", raising=False)
    assert main(["--pipeline", str(tmp_path / "p"), "--api-key-env", "DALLE3_TEST_KEY"]) == 2
    assert "DALLE3_TEST_KEY" in capsys.readouterr().err
    assert main(["--pipeline", str(tmp_path / "p"), "--blocklist", str(tmp_path / "none.txt")]) == 2
    assert "--blocklist" in capsys.readouterr().err
    assert main(["--pipeline", str(tmp_path / "p"), "--decoder-engine", str(tmp_path / "d.onnx")]) == 2
    assert "--decoder-engine" in capsys.readouterr().err


def test_style_vivid_upsamples_and_natural_keeps_the_prompt(pipe):
    class Upsampler:
        def upsample(self, prompts):
            return [f"{p}, bright colours" for p in prompts]

    pipe.upsampler = Upsampler()
    try:
        with ServerThread(create_app(pipe, ServeConfig())) as srv:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
            vivid = client.images.generate(prompt=PROMPT, style="vivid", response_format="b64_json")
            natural = client.images.generate(prompt=PROMPT, style="natural", response_format="b64_json")
    finally:
        pipe.upsampler = None
    assert vivid.data[0].revised_prompt == f"{PROMPT}, bright colours"
    assert natural.data[0].revised_prompt == PROMPT
