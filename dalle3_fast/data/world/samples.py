"""One scene-world sample as the shards store it: image plus the json record."""
from __future__ import annotations

from PIL import Image

from .captions import captions
from .scene import generate, scene_seed


def world_sample(seed: int, index: int, width: int = 64, height: int = 64) -> tuple[Image.Image, dict]:
    """Sample ``index`` of the run with ``seed``: (image, {"graph", "alt", "ssc", "dsc"})."""
    s = scene_seed(seed, index)
    image, graph = generate(s, width, height)
    return image, {"graph": graph.to_dict(), **captions(graph, s)}
