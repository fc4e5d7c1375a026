"""Runs a batch of jobs through the pipeline: prompts -> latents (one call) -> images."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from dalle3_fast.pipeline import to_pil
from dalle3_fast.serve.batching import Job, stop_when


class PipelineRunner:
    """``__call__(jobs, should_stop) -> [[PIL image per prompt] per job]``; jobs share one Settings.batch_key."""

    def __init__(self, pipe, threads: int | None = None):
        self.pipe = pipe
        self.threads = threads
        self._lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, jobs: list[Job], should_stop) -> list[list]:
        if self.threads:
            torch.set_num_threads(self.threads)
        s = jobs[0].settings
        prompts = [p for j in jobs for p in j.prompts]
        seeds = [seed for j in jobs for seed in j.seeds]
        init_latents = mask = None
        with self._lock:
            if jobs[0].kind == "edit":
                init_latents, mask = self.encode_edits(torch.cat([j.images for j in jobs]),
                                                       torch.cat([j.masks for j in jobs]))
            latents = self.pipe.generate_latents(prompts, width=s.width, height=s.height, steps=s.steps,
                                                 guidance=s.guidance, seeds=seeds, sampler=s.sampler,
                                                 init_latents=init_latents, mask=mask,
                                                 callback=stop_when(should_stop))
            images = to_pil(self.pipe.decode(latents, decoder=s.decoder, seeds=seeds))
        out, i = [], 0
        for job in jobs:
            out.append(images[i:i + job.count])
            i += job.count
        return out

    def encode_edits(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents; pixel masks (B, 1, H, W) -> latent masks.

        A latent cell is repainted if any of its pixels is (max-pooling), so no edited pixel is pinned to the
        original by the known-region replacement.
        """
        pipe = self.pipe
        z = pipe.vae.encode(images.to(device=pipe.device, dtype=pipe.dtype)).mode()
        f = pipe.downsample_factor
        latent_mask = F.max_pool2d(masks.to(device=pipe.device, dtype=pipe.dtype), kernel_size=f, stride=f)
        return pipe.vae.scale_latents(z), latent_mask
