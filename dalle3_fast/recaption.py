"""Rewrite a dataset's captions with a trained captioner (DALL-E 3's recaptioning stage).

    python -m dalle3_fast.recaption --captioner runs/captioner_dsc --input 'data/{000000..000099}.tar' \\
        --output data_dsc --style dsc

Each input shard becomes an output shard of the same name holding every original member of every
sample plus a ``.dsc`` (or ``.ssc``) text member (and the field in ``.json`` with --update-json).

Resumable: an output shard is written to a temp file and renamed when complete, so a rerun after a
crash or kill -9 skips finished shards and redoes the interrupted one, losing or duplicating nothing.
An input shard that is missing, not a tar or truncated fails: it gets no output shard, so a rerun
after it is repaired captions it whole. Samples whose image does not decode are skipped.
Failed shards and skipped samples are named on stderr (the first few, and how many) and in
OUTPUT/_recaption/: rank-R-of-W.json (the last run) and history-rank-R-of-W.jsonl (one line per run).
Distributed: under torchrun (RANK / WORLD_SIZE), rank r takes input shards r::world_size; ranks meet
at a barrier at the end.

Exit status: 0 when every shard of this rank is done; 1 when some input shards failed (repair them and
rerun: finished shards are kept); 2 on a usage error or a captioner that cannot be loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import zlib
from datetime import datetime, timezone
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .data.buckets import Bucket, image_to_tensor, resize_to_bucket
from .data.shards import CorruptSample, ShardStats, ShardWriter, expand_shards, iter_samples, remove_stale_temp_files
from .io import CheckpointError, append_line, atomic_write_bytes

STYLES = ("dsc", "ssc")
METHODS = ("greedy", "beam", "nucleus")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPORT_DIR = "_recaption"
SHOWN = 5  # names printed on stderr per list; the report holds them all


@dataclass
class RecaptionReport:
    rank: int = 0
    world_size: int = 1
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # already complete from an earlier run
    shards_failed: list[str] = field(default_factory=list)  # missing, not a tar or truncated: no output written
    failures: dict[str, str] = field(default_factory=dict)  # failed shard -> why
    samples_skipped: list[str] = field(default_factory=list)  # "SHARD:KEY (why)" in written shards (first 1000)
    samples_skipped_count: int = 0
    captioned: int = 0  # images in the shards written
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    seconds: float = 0.0
    stats: ShardStats = field(default_factory=ShardStats)

    def fail(self, name: str, why: str) -> None:
        self.shards_failed.append(name)
        self.failures[name] = why

    def as_dict(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "started": self.started,
                "shards_written": self.shards_written, "shards_skipped": self.shards_skipped,
                "shards_failed": self.shards_failed, "failures": self.failures,
                "samples_skipped": self.samples_skipped, "samples_skipped_count": self.samples_skipped_count,
                "captioned": self.captioned,
                "seconds": round(self.seconds, 3), "images_per_second": round(self.captioned / self.seconds, 2)
                if self.seconds else None, "read": self.stats.as_dict(), "errors": self.stats.errors}

    def summary_lines(self) -> list[str]:
        """The names on stderr: shards already done, failed shards (why), skipped samples; first few + count."""
        def names(items: list[str], total: int | None = None) -> str:
            total = len(items) if total is None else total
            more = total - min(len(items), SHOWN)
            return ", ".join(items[:SHOWN]) + (f", and {more} more" if more > 0 else "")

        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"

        lines = []
        if self.shards_skipped:
            lines.append(f"{n(len(self.shards_skipped), 'shard')} already done, kept: {names(self.shards_skipped)}")
        if self.shards_failed:
            lines.append(f"{n(len(self.shards_failed), 'shard')} failed, no output written (repair and rerun): "
                         + names([f"{s} ({self.failures.get(s, '?')})" for s in self.shards_failed]))
        if self.samples_skipped_count:
            lines.append(f"{n(self.samples_skipped_count, 'sample')} skipped: "
                         + names(self.samples_skipped, self.samples_skipped_count))
        return lines


DEFAULT_CAPTIONERS = {style: Path(__file__).resolve().parent / "assets" / f"captioner_{style}" for style in STYLES}


def load_captioner(directory, device: torch.device):
    """The CoCa captioner saved by ``save_pretrained`` in ``directory``, in eval mode on ``device``."""
    from .models.captioner import CoCa

    model = CoCa.from_pretrained(directory, device=device)
    if model.tokenizer is None:
        raise CheckpointError(f"captioner {str(directory)!r} has no tokenizer/ directory; it cannot write text")
    return model.eval()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def _shard_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def _prepared_batches(shard: str, stats: ShardStats, size: int, batch_size: int):
    """Lists of (sample, (3, size, size) tensor in [-1, 1]) from one shard, in file order."""
    batch = []
    for sample, image in iter_samples([shard], stats):
        batch.append((sample, image_to_tensor(resize_to_bucket(image, Bucket(size, size)))))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(iterator, depth: int = 2):
    """Run ``iterator`` in a background thread, ``depth`` items ahead; its exceptions re-raise here."""
    items: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(message) -> bool:
        while not stop.is_set():  # the consumer may have stopped listening
            try:
                items.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterator:
                if not put(("item", item)):
                    return
            put(("done", done))
        except BaseException as exc:  # handed to the consumer
            put(("error", exc))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def recaption(model, shards: str | list[str], output, *, style: str = "dsc", batch_size: int = 64,
              max_new_tokens: int | None = None, method: str = "greedy", num_beams: int = 4, top_p: float = 0.9,
              temperature: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32, update_json: bool = False,
              rank: int = 0, world_size: int = 1, progress: bool = True) -> RecaptionReport:
    """Caption this rank's share (``shards[rank::world_size]``) into ``output``; see the module doc.

    ``shards``: a brace spec or a list of paths/specs. Missing or unreadable input shards get no
    output shard (listed in ``shards_failed``), so a rerun retries them.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shards = expand_shards(shards)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    names = [Path(s).name for s in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"input shards share file names {duplicates[:3]}; output shards are named after the "
                         "input's, so give each input shard a distinct name")
    for s in shards:
        if (output / Path(s).name).resolve() == Path(s).resolve():
            raise ValueError(f"--output {str(output)!r} would overwrite the input shard {s}; use another directory")

    report = RecaptionReport(rank=rank, world_size=world_size)
    device = model.device
    size = model.config.image_size
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    mine = shards[rank::world_size]
    start = time.perf_counter()
    bar = tqdm(unit="img", desc=f"recaption {style}" + (f" rank {rank}" if world_size > 1 else ""),
               disable=not progress, dynamic_ncols=True)

    def caption_batch(batch, generator):
        images = torch.stack([t for _, t in batch]).to(device, non_blocking=True)
        with torch.inference_mode(), autocast:
            texts = model.generate(images, max_new_tokens=max_new_tokens, method=method, num_beams=num_beams,
                                   top_p=top_p, temperature=temperature, generator=generator)
        return [text.strip() for text in texts]

    for shard in mine:
        name = Path(shard).name
        target = output / name
        if target.exists():
            report.shards_skipped.append(name)
            continue
        remove_stale_temp_files(output, name)
        generator = None
        if method == "nucleus":
            generator = torch.Generator(device=device).manual_seed(_shard_seed(seed, name))
        if not os.path.isfile(shard):
            report.stats.note("missing_shards", f"shard {shard} does not exist")
            report.fail(name, "missing")
            continue
        unreadable_before, truncated_before = report.stats.unreadable_shards, report.stats.truncated_shards
        named_before = len(report.stats.skipped_samples)
        skipped_before = report.stats.incomplete_samples + report.stats.corrupt_images
        captioned = 0
        writer = ShardWriter(target)
        try:
            # decoding the next batch overlaps with captioning this one
            for batch in _prefetch(_prepared_batches(shard, report.stats, size, batch_size)):
                for (sample, _), text in zip(batch, caption_batch(batch, generator)):
                    members = dict(sample.members)
                    members[style] = text
                    if update_json and "json" in members:
                        try:
                            members["json"] = {**sample.json(), style: text}
                        except CorruptSample as exc:  # keep the original bytes untouched
                            report.stats.note("corrupt_members", str(exc))
                    writer.write(sample.key, members)
                captioned += len(batch)
                bar.update(len(batch))
        except BaseException:
            writer.discard()
            raise
        # not a tar, or truncated (the samples after the damage are lost): leave no output, so the shard is
        # retried whole once repaired, instead of a complete-looking shard that a rerun would skip
        why = ("not a readable tar" if report.stats.unreadable_shards > unreadable_before else
               "truncated" if report.stats.truncated_shards > truncated_before else None)
        if why:
            writer.discard()
            report.fail(name, why)
            continue
        writer.close()
        report.shards_written.append(name)
        report.captioned += captioned
        report.samples_skipped.extend(report.stats.skipped_samples[named_before:])
        report.samples_skipped_count += report.stats.incomplete_samples + report.stats.corrupt_images - skipped_before
    bar.close()
    report.seconds = time.perf_counter() - start
    stem = f"rank-{rank:05d}-of-{world_size:05d}"
    record = report.as_dict()
    atomic_write_bytes(output / REPORT_DIR / f"{stem}.json", (json.dumps(record, indent=2) + "\n").encode())
    append_line(output / REPORT_DIR / f"history-{stem}.jsonl", json.dumps(record))  # every run, never rewritten
    return report


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dalle3_fast.recaption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captioner", default=None,
                   help="captioner directory written by CoCa.save_pretrained (default: the embedded tiny captioner "
                        "of --style trained on the scene world, dalle3_fast/assets/captioner_dsc or captioner_ssc)")
    p.add_argument("--input", required=True, help="input shards, brace-expanded: 'data/{000000..000099}.tar'")
    p.add_argument("--output", required=True, help="output directory; shards keep the input's file names")
    p.add_argument("--style", choices=STYLES, default="dsc",
                   help="caption member to add: dsc (descriptive) or ssc (short); match the captioner's fine-tune")
    p.add_argument("--batch-size", type=int, default=64, help="images per generate call (default 64)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most new tokens per caption (default: the captioner's max_text_len - 1)")
    p.add_argument("--method", choices=METHODS, default="greedy", help="decoding: greedy, beam or nucleus")
    p.add_argument("--num-beams", type=int, default=4, help="beams for --method beam (default 4)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for --method nucleus (default 0.9)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --method nucleus")
    p.add_argument("--seed", type=int, default=0, help="seed for nucleus sampling (per shard, so reruns agree)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="autocast dtype: auto = bfloat16 (or float16) on GPU, float32 on CPU")
    p.add_argument("--update-json", action="store_true", help="also store the caption in each sample's .json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    distributed = world_size > 1
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        shards = expand_shards(args.input)
        if not any(os.path.isfile(s) for s in shards):
            raise ValueError(f"--input {args.input!r}: none of its {len(shards)} shards exist")
        device = _device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if distributed:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend)
        model = load_captioner(args.captioner or DEFAULT_CAPTIONERS[args.style], device)
        report = recaption(model, shards, args.output, style=args.style, batch_size=args.batch_size,
                           max_new_tokens=args.max_tokens, method=args.method, num_beams=args.num_beams,
                           top_p=args.top_p, temperature=args.temperature, seed=args.seed, dtype=dtype,
                           update_json=args.update_json, rank=rank, world_size=world_size,
                           progress=not args.no_progress and rank == 0)
    except (ValueError, CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 2
    rate = report.captioned / report.seconds if report.seconds else 0.0
    failed = f", {len(report.shards_failed)} failed" if report.shards_failed else ""
    print(f"rank {rank}/{world_size}: captioned {report.captioned} images into {len(report.shards_written)} shards "
          f"({len(report.shards_skipped)} already done{failed}) at {rate:.1f} images/s; read {report.stats}",
          file=sys.stderr)
    for line in report.summary_lines():
        print(f"rank {rank}/{world_size}: {line}", file=sys.stderr)
    if report.shards_failed or report.samples_skipped_count:
        print(f"rank {rank}/{world_size}: names and reasons in {Path(args.output) / REPORT_DIR} "
              f"(history-rank-{rank:05d}-of-{world_size:05d}.jsonl keeps every run)", file=sys.stderr)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 1 if report.shards_failed else 0


if __name__ == "__main__":
    sys.exit(main())
