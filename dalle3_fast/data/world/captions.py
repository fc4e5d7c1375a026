"""Three caption styles from a scene graph: alt-text, SSC and DSC.

* alt-text: what a web page says about an image. As the DALL-E 3 paper describes it: only the main
  subject, counts and positions sometimes wrong, colours often missing, text never mentioned, and
  sometimes unrelated words.
* SSC (short synthetic caption): the main subject, exact.
* DSC (descriptive synthetic caption): every group with count, size, colour and shape, every stated
  relation to the main subject, the background and the written word with its position, in varied
  sentence forms and orders. ``parse_caption`` reads any DSC back into ``graph.semantic()``.
"""
from __future__ import annotations

import random
import re

from .graph import ABOVE, SHAPE_PLURALS, Group, GroupKey, SceneGraph

COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
# surface forms per (canonical or inverse) predicate; the parser knows all of them
PREDICATE_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
WORD_POSITION_PHRASES = {"top": ("at the top", "along the top", "near the top"),
                         "middle": ("in the middle", "across the middle", "in the centre"),
                         "bottom": ("at the bottom", "along the bottom", "near the bottom")}
ALT_SHAPE_SYNONYMS = {"circle": ("dot", "ball", "round thing"), "square": ("block", "tile"),
                      "triangle": ("pyramid", "arrow"), "diamond": ("rhombus", "gem"), "cross": ("plus", "plus sign"),
                      "star": ("sparkle", "starburst")}
ALT_NOISE = ("clipart", "stock image", "icon", "free download", "vector art", "wallpaper", "img_{n}",
             "DSC{n}", "cute", "simple design", "kids drawing", "logo", "background", "pattern")
ALT_POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the corner")


def _rng(seed) -> random.Random:
    return seed if isinstance(seed, random.Random) else random.Random(seed)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun(shape: str, count: int) -> str:
    return shape if count == 1 else SHAPE_PLURALS[shape]


def group_phrase(group: Group, rng: random.Random | None = None) -> str:
    """'a large red circle', 'one small blue star', 'three large green squares'."""
    k, n = group.key, group.count
    body = f"{k.size} {k.colour} {noun(k.shape, n)}"
    if n == 1:
        return f"{'one' if rng is not None and rng.random() < 0.15 else _article(k.size)} {body}"
    return f"{COUNT_WORDS[n]} {body}"


def reference(key: GroupKey, count: int) -> str:
    """Definite reference used in relation sentences: 'the large red circles'."""
    return f"the {key.size} {key.colour} {noun(key.shape, count)}"


def group_mentions(text: str, graph: SceneGraph) -> list[tuple[int, Group]]:
    """(end offset in ``text``, group) of every mention of one of ``graph``'s groups: the
    "{size} {colour} {noun}" that ``group_phrase`` and ``reference`` write, in text order."""
    found = []
    for g in graph.groups():
        k = g.key
        for m in re.finditer(rf"\b{k.size} {k.colour} {noun(k.shape, g.count)}\b", text):
            found.append((m.end(), g))
    return sorted(found, key=lambda item: item[0])


def _join(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    comma = "," if len(items) > 2 and rng.random() < 0.5 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def ssc(graph: SceneGraph, seed=0) -> str:
    """Short synthetic caption: the main subject only, exact."""
    rng = _rng(seed)
    main = graph.main_subject
    if main is None:
        return f"An empty {graph.background} background."
    phrase = group_phrase(main, rng)
    return rng.choice((f"{_cap(phrase)}.", f"An image of {phrase}.", f"A picture of {phrase}."))


def _relation_sentence(rel_preds: list[str], a: Group, b: Group, rng: random.Random) -> str:
    """One sentence stating every predicate in ``rel_preds`` (canonical, a -> b) for the pair."""
    if rng.random() < 0.5:  # state it from b's side with inverse predicates
        a, b, rel_preds = b, a, [INVERSE[p] for p in rel_preds]
    phrases = [rng.choice(PREDICATE_PHRASES[p]) for p in sorted(rel_preds, key=lambda p: p not in (ABOVE, "below"))]
    pred = " and ".join(phrases)
    verb_a = "is" if a.count == 1 else "are"
    ref_a, ref_b = reference(a.key, a.count), reference(b.key, b.count)
    form = rng.randrange(3)
    if form == 0:
        return f"{_cap(ref_a)} {verb_a} {pred} {ref_b}."
    if form == 1:
        sit = "sits" if a.count == 1 else "sit"
        return f"{_cap(ref_a)} {sit} {pred} {ref_b}."
    return f"{_cap(pred)} {ref_b} {verb_a} {ref_a}."


def _word_sentence(word: str, position: str | None, rng: random.Random) -> str:
    where = rng.choice(WORD_POSITION_PHRASES[position or "middle"])
    return rng.choice((f'The word "{word}" is written {where}.', f'Text {where} reads "{word}".',
                       f'The text "{word}" appears {where} of the image.'))


def dsc(graph: SceneGraph, seed=0) -> str:
    """Descriptive synthetic caption; varied templates and orders drawn from ``seed``."""
    rng = _rng(seed)
    groups = graph.groups()
    if not groups:
        return f"An empty {graph.background} background."
    others = groups[1:]
    rng.shuffle(others)
    listed = _join([group_phrase(g, rng) for g in [groups[0], *others]], rng)
    bg = graph.background
    separate_background = False
    intro_form = rng.randrange(5)
    if intro_form == 0:
        intro = f"{_cap(listed)} on a {bg} background."
    elif intro_form == 1:
        intro = f"A {bg} background with {listed}."
    elif intro_form == 2:
        intro, separate_background = f"The image shows {listed}.", True
    elif intro_form == 3:
        verb = "is" if groups[0].count == 1 else "are"
        intro = f"There {verb} {listed} against a plain {bg} background."
    else:
        intro, separate_background = f"In this picture: {listed}.", True
    tail = []
    by_key = {g.key: g for g in groups}
    pairs: dict[tuple[GroupKey, GroupKey], list[str]] = {}
    for r in graph.relations:
        pairs.setdefault((r.subject, r.object), []).append(r.predicate)
    for (s, o), preds in sorted(pairs.items()):
        tail.append(_relation_sentence(preds, by_key[s], by_key[o], rng))
    if graph.word:
        tail.append(_word_sentence(graph.word, graph.word_position, rng))
    if separate_background:
        tail.append(rng.choice((f"The background is {bg}.", f"The background is plain {bg}.",
                                f"Everything sits on a {bg} background.")))
    rng.shuffle(tail)
    return " ".join([intro, *tail])


def alt_text(graph: SceneGraph, seed=0) -> str:
    """Noisy web-style alt-text about the main subject (never mentions the written word)."""
    rng = _rng(seed)
    main = graph.main_subject
    if main is None or rng.random() < 0.05:
        return rng.choice(("untitled", "image", "shapes", "abstract art", "new post"))
    count = main.count
    if rng.random() < 0.25:  # wrong or dropped count
        count = rng.choice([c for c in (1, 2, 3) if c != count])
    shape = main.key.shape
    name = rng.choice(ALT_SHAPE_SYNONYMS[shape]) if rng.random() < 0.15 else shape
    if count > 1:
        name = SHAPE_PLURALS.get(name, name + "s")
    words = []
    if rng.random() < 0.15:
        words.append(main.key.size)
    if rng.random() < 0.45:
        words.append(main.key.colour)
    words.append(name)
    if count > 1 and rng.random() < 0.7:
        words.insert(0, COUNT_WORDS[count])
    elif count == 1 and rng.random() < 0.4:
        words.insert(0, _article(words[0]))
    text = " ".join(words)
    if rng.random() < 0.2:  # a position, right or wrong
        text += " " + rng.choice(ALT_POSITIONS)
    if rng.random() < 0.35:
        noise = rng.choice(ALT_NOISE).format(n=rng.randrange(1000, 9999))
        text = f"{noise} {text}" if rng.random() < 0.5 else f"{text} {noise}"
    if rng.random() < 0.3:
        text = _cap(text)
    return text


def captions(graph: SceneGraph, seed) -> dict[str, str]:
    """All three styles, each from its own stream of ``seed`` so adding one does not shift the others."""
    return {"alt": alt_text(graph, f"{seed}:alt"), "ssc": ssc(graph, f"{seed}:ssc"), "dsc": dsc(graph, f"{seed}:dsc")}


__all__ = ["alt_text", "ssc", "dsc", "captions", "group_phrase", "reference", "PREDICATE_PHRASES"]
