"""The OpenAI-compatible Images API on a ``Dalle3Pipeline`` (FastAPI).

    POST /v1/images/generations   JSON {model, prompt, n, size, quality, style, response_format, user}
    POST /v1/images/edits         multipart {image, mask?, prompt, model, n, size, response_format, user}
    GET  /v1/files/<id>.png       images of response_format=url, for ``url_ttl_s`` seconds
    GET  /v1/models  /health  /metrics

Every field is checked before a request joins a batch (strictly typed, as OpenAI does: ``"n": "2"`` or
``true`` is a 400), sizes are those the pipeline was made for (or the operator's ``sizes``), bodies are capped
(413), and a request whose client has gone away is cancelled.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict

from dalle3_fast.serve.batching import Batcher, Job, JobCancelled, QueueFull
from dalle3_fast.serve.errors import APIError, install_handlers, invalid
from dalle3_fast.serve.files import FileStore
from dalle3_fast.serve.gate import RequestGate
from dalle3_fast.serve.images import prepare_edit
from dalle3_fast.serve.metrics import Metrics
from dalle3_fast.serve.policy import RESPONSE_FORMATS, Blocklist, RequestPolicy
from dalle3_fast.serve.runner import PipelineRunner

log = logging.getLogger("dalle3_fast.serve")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; nobody reads it
MAX_IMAGE_BYTES = 4 * 2 ** 20  # OpenAI's limit for edit images and masks
MAX_JSON_BYTES = 2 ** 20       # a 4000-character prompt is at most ~50 kB of JSON
EDITS_PATH = "/v1/images/edits"


@dataclass
class ServeConfig:
    model_name: str = "dalle3-fast"
    max_batch: int = 8
    max_queue: int = 64
    batch_window_ms: float = 20.0
    timeout_s: float = 120.0
    url_ttl_s: float = 3600.0
    api_key: str | None = None
    blocklist: Blocklist | None = None
    steps: int | None = None
    max_pixels: int | None = None
    threads: int | None = None
    sizes: list[str] | None = None          # sizes served; default: the pipeline's own
    max_json_bytes: int = MAX_JSON_BYTES    # body cap of JSON requests
    max_image_bytes: int = MAX_IMAGE_BYTES  # cap of each edit image / mask

    @property
    def max_multipart_bytes(self) -> int:
        """Body cap of /v1/images/edits: image, mask, and the other fields."""
        return 2 * self.max_image_bytes + self.max_json_bytes

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys(["dall-e-3", "dall-e-2", self.model_name]))


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # no coercion: "n": "2", true or 2.0 is a 400

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    response_format: str | None = None
    user: str | None = None


def create_app(pipe, config: ServeConfig | None = None) -> FastAPI:
    """Raises ValueError for a configured size the pipeline cannot generate."""
    config = config or ServeConfig()
    metrics = Metrics()
    policy = RequestPolicy(pipe, model_names=config.model_names, blocklist=config.blocklist, steps=config.steps,
                           max_pixels=config.max_pixels, sizes=config.sizes)
    batcher = Batcher(PipelineRunner(pipe, config.threads), max_batch=config.max_batch, max_queue=config.max_queue,
                      window_s=config.batch_window_ms / 1000, metrics=metrics)
    files = FileStore(config.url_ttl_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="dalle3_fast Images API", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.policy, app.state.files = batcher, metrics, policy, files
    install_handlers(app)
    app.add_middleware(RequestGate, api_key=config.api_key, body_limit=lambda path: (
        config.max_multipart_bytes if path == EDITS_PATH else config.max_json_bytes))

    async def run(job: Job, started: float, request: Request) -> list[Image.Image]:
        loop = asyncio.get_running_loop()
        job.loop, job.future = loop, loop.create_future()
        try:
            batcher.submit(job)
        except QueueFull as exc:
            rate = metrics.snapshot()["images_per_s"]
            retry = max(1, int(np.ceil(batcher.depth / rate))) if rate > 0 else 1
            metrics.record_request(time.monotonic() - started, 429)
            raise APIError(429, f"The server is overloaded ({exc}); retry after {retry} s.", type="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": str(retry)}) from None
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([job.future, gone], timeout=max(0.0, job.deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is shutting down, or the ASGI server cancelled the request
            batcher.cancel(job)
            raise
        finally:
            gone.cancel()
        if job.future.done() and not isinstance(job.future.exception(), JobCancelled):
            return job.future.result()
        batcher.cancel(job)  # drops it from the queue, or stops its batch if no one else is waiting on it
        if not job.future.done() and gone.done() and not gone.cancelled():
            metrics.record_request(time.monotonic() - started, CLIENT_CLOSED)
            raise APIError(CLIENT_CLOSED, "The client closed the connection; the request was cancelled.",
                           code="client_closed_request")
        metrics.record_request(time.monotonic() - started, 504)
        raise APIError(504, f"The request did not finish within {config.timeout_s:g} s and was cancelled.",
                       type="timeout", code="timeout")

    async def respond(images, revised, response_format: str, request: Request, started: float) -> JSONResponse:
        pngs = await asyncio.to_thread(lambda: [_png(im) for im in images])
        data = []
        for png, prompt in zip(pngs, revised):
            if response_format == "b64_json":
                data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": prompt})
            else:
                data.append({"url": f"{str(request.base_url).rstrip('/')}/v1/files/{files.put(png)}.png",
                             "revised_prompt": prompt})
        metrics.record_request(time.monotonic() - started)
        return JSONResponse({"created": int(time.time()), "data": data})

    def new_job(kind, settings, prompts) -> Job:
        seeds = [secrets.randbits(31) for _ in prompts]
        return Job(kind, settings, prompts, seeds, deadline=time.monotonic() + config.timeout_s)

    @app.post("/v1/images/generations")
    async def generations(body: GenerationRequest, request: Request):
        started = time.monotonic()
        policy.model(body.model)
        prompt = policy.prompt(body.prompt, "generations")
        n = policy.n(1 if body.n is None else body.n)
        settings = policy.settings(size=body.size, quality=body.quality, style=body.style)
        response_format = policy.choice("response_format", body.response_format, RESPONSE_FORMATS, "url")
        revised = prompt
        if settings.upsample:
            revised = (await asyncio.to_thread(pipe.revise, [prompt], pipe.upsampler))[0] or prompt
        images = await run(new_job("generate", settings, [revised] * n), started, request)
        return await respond(images, [revised] * n, response_format, request, started)

    @app.post("/v1/images/edits")
    async def edits(request: Request, image: UploadFile = File(...), prompt: str = Form(...),
                    mask: UploadFile | None = File(None), model: str | None = Form(None),
                    n: str | None = Form(None), size: str | None = Form(None),
                    response_format: str | None = Form(None), user: str | None = Form(None)):
        started = time.monotonic()
        policy.model(model)
        prompt = policy.prompt(prompt, "edits")
        n = policy.n(_form_int("n", n, default=1))
        response_format = policy.choice("response_format", response_format, RESPONSE_FORMATS, "url")
        picture = await _read_upload(image, "image", config.max_image_bytes)
        alpha = await _read_upload(mask, "mask", config.max_image_bytes) if mask is not None else None
        inputs = await asyncio.to_thread(prepare_edit, policy, picture, alpha, size)
        job = new_job("edit", inputs.settings, [prompt] * n)
        job.images, job.masks = inputs.images.expand(n, -1, -1, -1), inputs.masks.expand(n, -1, -1, -1)
        images = await run(job, started, request)
        return await respond(images, [prompt] * n, response_format, request, started)

    @app.get("/v1/files/{name}")
    async def get_file(name: str):
        data = files.get(name[:-4]) if name.endswith(".png") else None
        if data is None:
            raise APIError(404, f"File {name} does not exist or has expired (URLs live {config.url_ttl_s:g} s).",
                           param="file", code="file_not_found")
        return Response(data, media_type="image/png")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "dalle3_fast", "sizes": policy.sizes,
                                            "default_size": policy.default_size} for name in config.model_names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "queue_depth": batcher.depth,
                "sizes": policy.sizes, "device": str(pipe.device)}

    @app.get("/metrics")
    async def get_metrics(request: Request, format: str | None = None):
        if format not in (None, "json", "prometheus"):
            raise invalid("format", "'format' must be json or prometheus.")
        metrics.set_queue_depth(batcher.depth)
        if format == "prometheus" or (format is None and "text/plain" in request.headers.get("accept", "")):
            return PlainTextResponse(metrics.prometheus(), media_type="text/plain; version=0.0.4")
        return metrics.snapshot()

    return app


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def _read_upload(upload: UploadFile, param: str, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise invalid(param, f"'{param}' is larger than this server accepts ({limit} bytes).")
    return data


def _form_int(name: str, value: str | None, default: int) -> int:
    """A multipart field as an integer: decimal digits only (no "2.0", "true" or " 2")."""
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", value):
        raise invalid(name, f"Invalid type for '{name}': expected an integer, but got {value!r} instead.",
                      code="invalid_type")
    return int(value)


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (its body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # a server that answers at once with empty body messages is polled, not spun
