"""The scene world: seeded procedural images with a scene graph each, three caption styles, a caption
parser, a pixel detector and per-attribute comparison. ``python -m dalle3_fast.data.world`` writes shards.

    image, graph = generate(seed=0, width=64, height=64)
    caps = captions(graph, seed=0)            # {"alt", "ssc", "dsc"}
    parse_caption(caps["dsc"]) == graph.semantic()
    compare(detect(image), graph)             # {"shape": True, "colour": True, ...}
    realize(parse_caption("two red circles above a blue star"))   # a placed scene showing a prompt
"""
from .captions import alt_text, captions, dsc, ssc
from .compare import accuracy, compare, relation_directions
from .detector import detect
from .graph import (BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SIZES, WORD_POSITIONS, Group, GroupKey, Relation,
                    SceneGraph, SceneObject)
from .parser import parse_caption
from .prompts import CATEGORIES, PromptCase, prompt_cases
from .scene import WORDS, generate, realize, render, sample_scene, scene_seed
from .samples import world_sample

__all__ = ["generate", "realize", "render", "sample_scene", "scene_seed", "world_sample", "captions", "alt_text", "ssc", "dsc",
           "parse_caption", "prompt_cases", "PromptCase", "CATEGORIES", "detect", "compare", "accuracy", "relation_directions", "SceneGraph", "SceneObject", "Group", "GroupKey",
           "Relation", "SHAPES", "SIZES", "OBJECT_COLOURS", "BACKGROUND_COLOURS", "WORD_POSITIONS", "WORDS"]
