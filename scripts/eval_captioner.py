"""How well captioners write descriptive captions: per-attribute accuracy on held-out scene-world images.

    python scripts/eval_captioner.py --captioner pretrained=runs/captioners/pretrain/final \\
        --captioner ssc=runs/captioners/ssc/final --captioner dsc=runs/captioners/deepen/final \\
        --n 500 --seed 1 --json runs/captioners/eval.json

Each captioner writes one caption per image (greedy by default); ``parse_caption`` reads it back into a
scene graph, which ``compare`` checks against the image's true graph, attribute by attribute: shape,
colour, binding (colour on the right shape), size, count, position (the stated left/right/above/below
relations), background, word (the text rendered in the image; ``None`` == ``None`` on images without
text, so ``word_in_image`` also reports it on the images that have one) and ``all`` (exact match: every
attribute holds). ``direction`` isolates the spatial judgement inside "position": of the stated relations
whose predicate and two objects match a true relation, the fraction pointing the right way (0.5 is chance;
pooled over all images, so it is absent when no such relation was stated).

A caption from which the parser reads no object at all (alt-text style such as "clipart dot", or
nonsense) is a *parse failure*: every attribute counts as a miss for it, and its rate is reported.

The images come from the world seed ``--seed`` (the training shards use seed 0), so none was trained
on. A ``reference`` row parses the true DSC of every image: it must be 1.0 everywhere, or the
parser/compare disagree with the generator and the other rows mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ATTRIBUTES = ("shape", "colour", "binding", "size", "count", "position", "background", "word", "word_in_image", "all")
TABLE_COLUMNS = (("shape", "shape"), ("colour", "colour"), ("count", "count"), ("relation", "position"),
                 ("word (text images)", "word_in_image"), ("background", "background"), ("exact", "all"),
                 ("direction", "direction"), ("parse fail", "parse_failures"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/eval_captioner.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captioner", action="append", required=True, metavar="NAME=DIR",
                   help="a captioner directory (CoCa.save_pretrained) and the name its row gets; repeatable")
    p.add_argument("--n", type=int, default=500, help="held-out images (default 500)")
    p.add_argument("--seed", type=int, default=1, help="scene-world seed of the held-out images (training uses 0)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--batch-size", type=int, default=100, help="images per generate call (default 100)")
    p.add_argument("--method", choices=("greedy", "beam"), default="greedy", help="decoding method (default greedy)")
    p.add_argument("--num-beams", type=int, default=4, help="beams for --method beam (default 4)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most new tokens per caption (default: each captioner's max_text_len - 1)")
    p.add_argument("--examples", type=int, default=5, help="captions per captioner kept in the JSON (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--json", default=None, help="write the results here (default: print them only)")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.size < 24 or args.threads < 1:
        p.error("--n, --batch-size and --threads must be >= 1 and --size >= 24")
    named = []
    for item in args.captioner:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            p.error(f"--captioner {item!r}: write it as NAME=DIR, e.g. dsc=runs/captioners/dsc/final")
        if not (Path(directory) / "config.json").is_file():
            p.error(f"--captioner {item!r}: {directory!r} holds no config.json; give a CoCa.save_pretrained directory")
        named.append((name, directory))
    if len({n for n, _ in named}) != len(named):
        p.error("--captioner: each NAME must be distinct")
    args.captioner = named
    return args


def held_out(seed: int, n: int, size: int):
    """(images (n, 3, size, size) in [-1, 1], true graphs, true DSCs) of world ``seed``."""
    import torch

    from dalle3_fast.data.buckets import image_to_tensor
    from dalle3_fast.data.world import SceneGraph, world_sample

    images, graphs, dscs = [], [], []
    for i in range(n):
        image, record = world_sample(seed, i, size, size)
        images.append(image_to_tensor(image))
        graphs.append(SceneGraph.from_dict(record["graph"]))
        dscs.append(record["dsc"])
    return torch.stack(images), graphs, dscs


def score_captions(captions: list[str], graphs) -> dict:
    """Accuracy per attribute of ``captions`` against ``graphs``, parse failures counted as misses."""
    from dalle3_fast.data.world import accuracy, compare, parse_caption, relation_directions

    results, failures, right, wrong = [], 0, 0, 0
    for text, truth in zip(captions, graphs):
        parsed = parse_caption(text)
        result = compare(parsed, truth)
        r, w = relation_directions(parsed, truth)
        right, wrong = right + r, wrong + w
        if not parsed.objects and truth.objects:
            failures += 1
            result = {k: False for k in result}
        if truth.word:
            result["word_in_image"] = result["word"]
        results.append(result)
    acc = accuracy(results)
    if right + wrong:
        acc["direction"] = right / (right + wrong)
    return {"accuracy": {k: round(acc[k], 4) for k in (*ATTRIBUTES, "direction") if k in acc},
            "parse_failures": round(failures / len(captions), 4), "directed_relations": right + wrong}


def caption_all(model, images, batch_size: int, method: str, num_beams: int, max_tokens) -> list[str]:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out += model.generate(images[start: start + batch_size], method=method, num_beams=num_beams,
                                  max_new_tokens=max_tokens)
    return [t.strip() for t in out]


def markdown_table(results: dict) -> str:
    head = "| captioner | " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [head, rule]
    for name, r in results.items():
        cells = [r["parse_failures"] if key == "parse_failures" else r["accuracy"].get(key, float("nan"))
                 for _, key in TABLE_COLUMNS]
        rows.append(f"| {name} | " + " | ".join("-" if c != c else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from dalle3_fast.io import CheckpointError
    from dalle3_fast.models.captioner import CoCa

    images, graphs, dscs = held_out(args.seed, args.n, args.size)
    with_word = sum(1 for g in graphs if g.word)
    results = {"reference": {**score_captions(dscs, graphs), "directory": None, "note": "parses the true DSCs"}}
    for name, directory in args.captioner:
        try:
            model = CoCa.from_pretrained(directory)
        except (CheckpointError, ValueError, OSError) as exc:
            print(f"error: --captioner {name}={directory}: {exc}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        captions = caption_all(model, images, args.batch_size, args.method, args.num_beams, args.max_tokens)
        seconds = time.perf_counter() - t0
        results[name] = {**score_captions(captions, graphs), "directory": str(directory),
                         "images_per_second": round(len(captions) / seconds, 2),
                         "mean_caption_words": round(sum(len(c.split()) for c in captions) / len(captions), 2),
                         "examples": [{"caption": c, "truth": d} for c, d in zip(captions[:args.examples],
                                                                                  dscs[:args.examples])]}
        print(f"[eval] {name}: exact {results[name]['accuracy']['all']:.3f}, parse failures "
              f"{results[name]['parse_failures']:.3f}, {len(captions) / seconds:.1f} images/s", file=sys.stderr)
    report = {"seed": args.seed, "n": args.n, "size": args.size, "images_with_word": with_word,
              "method": args.method, "torch_threads": args.threads, "captioners": results}
    print(markdown_table(results))
    if args.json:
        from dalle3_fast.io import atomic_write_bytes
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
