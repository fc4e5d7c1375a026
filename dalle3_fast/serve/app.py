"""The OpenAI-compatible Images API on a ``Dalle3Pipeline`` (FastAPI).

    POST /v1/images/generations   JSON {model, prompt, n, size, quality, style, response_format, user}
    POST /v1/images/edits         multipart {image, mask?, prompt, model, n, size, response_format, user}
    GET  /v1/files/<id>.png       images of response_format=url, for ``url_ttl_s`` seconds
    GET  /v1/models  /health  /metrics
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from dalle3_fast.pipeline import from_pil
from dalle3_fast.serve.batching import Batcher, Job, JobCancelled, QueueFull
from dalle3_fast.serve.errors import APIError, install_handlers, invalid
from dalle3_fast.serve.files import FileStore
from dalle3_fast.serve.metrics import Metrics
from dalle3_fast.serve.policy import RESPONSE_FORMATS, Blocklist, RequestPolicy, check_api_key
from dalle3_fast.serve.runner import PipelineRunner

log = logging.getLogger("dalle3_fast.serve")
MAX_UPLOAD_BYTES = 4 * 2 ** 20  # OpenAI's limit for edit images and masks


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

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys(["dall-e-3", "dall-e-2", self.model_name]))


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    response_format: str | None = None
    user: str | None = None


def create_app(pipe, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    metrics = Metrics()
    policy = RequestPolicy(pipe, model_names=config.model_names, blocklist=config.blocklist, steps=config.steps,
                           max_pixels=config.max_pixels)
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

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/") and not path.startswith("/v1/files/"):
            try:
                check_api_key(config.api_key, request.headers.get("authorization"))
            except APIError as exc:
                return exc.response()
        return await call_next(request)

    async def run(job: Job, started: float) -> list[Image.Image]:
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
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=max(0.0, job.deadline - time.monotonic()))
        except (asyncio.TimeoutError, JobCancelled):
            batcher.cancel(job)
            metrics.record_request(time.monotonic() - started, 504)
            raise APIError(504, f"The request did not finish within {config.timeout_s:g} s and was cancelled.",
                           type="timeout", code="timeout") from None
        except asyncio.CancelledError:  # the client disconnected
            batcher.cancel(job)
            raise

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
        images = await run(new_job("generate", settings, [revised] * n), started)
        return await respond(images, [revised] * n, response_format, request, started)

    @app.post("/v1/images/edits")
    async def edits(request: Request, image: UploadFile = File(...), prompt: str = Form(...),
                    mask: UploadFile | None = File(None), model: str | None = Form(None), n: int = Form(1),
                    size: str | None = Form(None), response_format: str | None = Form(None),
                    user: str | None = Form(None)):
        started = time.monotonic()
        policy.model(model)
        prompt = policy.prompt(prompt, "edits")
        n = policy.n(n)
        response_format = policy.choice("response_format", response_format, RESPONSE_FORMATS, "url")
        picture = await _read_png(image, "image")
        alpha_source = await _read_png(mask, "mask") if mask is not None else picture
        if mask is not None and alpha_source.size != picture.size:
            raise invalid("mask", f"'mask' is {alpha_source.size[0]}x{alpha_source.size[1]} but 'image' is "
                                  f"{picture.size[0]}x{picture.size[1]}; they must be the same size.")
        edit = _transparent_region(alpha_source, "mask" if mask is not None else "image")
        if size is None:
            native = f"{picture.size[0]}x{picture.size[1]}"
            size = native if native in policy.sizes else None
        settings = policy.settings(size=size, quality=None, style=None)
        target = (settings.width, settings.height)
        rgb = from_pil([picture.convert("RGB").resize(target, Image.BICUBIC)])
        edit = edit.resize(target, Image.NEAREST)
        region = torch.from_numpy(np.asarray(edit, dtype=np.float32) / 255.0)[None, None]
        job = new_job("edit", settings, [prompt] * n)
        job.images, job.masks = rgb.expand(n, -1, -1, -1), region.expand(n, -1, -1, -1)
        images = await run(job, started)
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
                                            "owned_by": "dalle3_fast"} for name in config.model_names]}

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


async def _read_png(upload: UploadFile, param: str) -> Image.Image:
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise invalid(param, f"'{param}' is larger than {MAX_UPLOAD_BYTES // 2 ** 20} MB.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise invalid(param, f"'{param}' is not a valid PNG image: {exc}") from None
    if image.format != "PNG":
        raise invalid(param, f"'{param}' must be a PNG image; got {image.format}.")
    return image


def _transparent_region(image: Image.Image, param: str) -> Image.Image:
    """The fully transparent pixels of ``image`` as an "L" image (255 = edit)."""
    if image.mode not in ("RGBA", "LA") and not (image.mode == "P" and "transparency" in image.info):
        raise invalid(param, f"'{param}' has no alpha channel; the transparent pixels mark the region to edit "
                             "(pass an RGBA PNG, or a mask).")
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    edit = alpha == 0
    if not edit.any():
        raise invalid(param, f"'{param}' has no fully transparent pixels; nothing to edit.")
    return Image.fromarray((edit * 255).astype(np.uint8), mode="L")
