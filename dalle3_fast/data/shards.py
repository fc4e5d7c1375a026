"""WebDataset tar shards as img2dataset writes them: ``key.jpg|png`` + ``key.txt`` + ``key.json``.

Writing: ``ShardWriter`` writes a temp file in the target directory and renames it on close, so a
shard is whole or absent. Members get fixed metadata (mtime 0, mode 0644), so equal samples give
byte-identical shards.

Reading: ``iter_samples`` groups consecutive members sharing a key into a ``Sample``. Missing
shards, files that are not tars, truncated tars (the sample in progress is dropped), samples
without an image and images that do not decode are skipped and counted in ``ShardStats``; the
reader never raises on bad data.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from braceexpand import braceexpand
from PIL import Image

from dalle3_fast.io import fsync_dir

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_SHARD_SIZE = 10_000
_MAX_ERRORS_KEPT = 20
_MAX_NAMES_KEPT = 1000


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """'data/{000000..000099}.tar' (or a list of such specs) -> the list of shard paths, in order."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths = [p for s in specs for p in braceexpand(os.fspath(s))]
    if not paths:
        raise ValueError(f"shard spec {spec!r} names no shards; pass e.g. 'data/{{000000..000009}}.tar'")
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000001.seg.png' -> ('dir/000001', 'seg.png'): the key ends at the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


@dataclass
class ShardStats:
    """What a reader read and what it skipped (and why)."""
    shards: int = 0
    samples: int = 0
    missing_shards: int = 0
    unreadable_shards: int = 0  # not a tar at all
    truncated_shards: int = 0
    incomplete_samples: int = 0  # no image member, or cut off by truncation
    corrupt_images: int = 0
    corrupt_members: int = 0  # e.g. a json that does not parse
    errors: list[str] = field(default_factory=list)
    skipped_samples: list[str] = field(default_factory=list)  # "SHARD:KEY (why)", the first 1000

    @property
    def skipped(self) -> int:
        return self.incomplete_samples + self.corrupt_images + self.corrupt_members

    def note(self, counter: str, message: str, sample: str | None = None) -> None:
        """Count one problem; ``sample`` ("SHARD:KEY (why)") names a sample that was skipped for it."""
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.errors) < _MAX_ERRORS_KEPT:
            self.errors.append(message)
        if sample is not None and len(self.skipped_samples) < _MAX_NAMES_KEPT:
            self.skipped_samples.append(sample)

    def merge(self, other: "ShardStats") -> "ShardStats":
        for name in ("shards", "samples", "missing_shards", "unreadable_shards", "truncated_shards",
                     "incomplete_samples", "corrupt_images", "corrupt_members"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors[: max(0, _MAX_ERRORS_KEPT - len(self.errors))])
        self.skipped_samples.extend(other.skipped_samples[: max(0, _MAX_NAMES_KEPT - len(self.skipped_samples))])
        return self

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("errors", "skipped_samples")}

    def __str__(self) -> str:
        bad = ", ".join(f"{k} {v}" for k, v in self.as_dict().items() if k not in ("shards", "samples") and v)
        return f"{self.samples} samples from {self.shards} shards" + (f"; skipped: {bad}" if bad else "")


class CorruptSample(ValueError):
    """A member of a sample that cannot be decoded."""


@dataclass
class Sample:
    key: str
    members: dict[str, bytes]
    shard: str = ""

    @property
    def image_extension(self) -> str | None:
        return next((e for e in IMAGE_EXTENSIONS if e in self.members), None)

    def image(self) -> Image.Image:
        """The image, fully decoded and converted to RGB; ``CorruptSample`` if it does not decode."""
        ext = self.image_extension
        if ext is None:
            raise CorruptSample(f"sample {self.key!r} has no image member")
        try:
            with Image.open(io.BytesIO(self.members[ext])) as im:
                im.load()
                return im.convert("RGB")
        except Exception as exc:  # PIL raises many types for bad bytes
            raise CorruptSample(f"image {self.key}.{ext} in {self.shard} does not decode ({exc})") from exc

    def text(self, ext: str = "txt") -> str | None:
        data = self.members.get(ext)
        return None if data is None else data.decode("utf-8", errors="replace")

    def json(self) -> dict | None:
        data = self.members.get("json")
        if data is None:
            return None
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptSample(f"{self.key}.json in {self.shard} is not valid JSON ({exc})") from exc
        if not isinstance(value, dict):
            raise CorruptSample(f"{self.key}.json in {self.shard} is not a JSON object")
        return value


def iter_shard(path: str, stats: ShardStats | None = None) -> Iterator[Sample]:
    """Raw samples of one shard in file order; bad or truncated tars end the shard early, counted."""
    stats = stats if stats is not None else ShardStats()
    if not os.path.isfile(path):
        stats.note("missing_shards", f"shard {path} does not exist")
        return
    stats.shards += 1
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_member_name(info.name)
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is cut short")
                if k != key and key is not None:
                    yield Sample(key, members, path)
                    members = {}
                key = k
                members[ext] = data
            if key is not None and not _has_end_of_archive(path, tar.offset):
                raise tarfile.ReadError("the end-of-archive blocks are missing")
    except (tarfile.ReadError, EOFError, OSError, ValueError) as exc:
        if key is None:
            stats.shards -= 1
            stats.note("unreadable_shards", f"shard {path} is not a readable tar ({exc})")
        else:
            stats.note("truncated_shards", f"shard {path} is truncated after {key!r} ({exc})")
            stats.note("incomplete_samples", f"sample {key!r} in {path} cut off by truncation",
                       f"{path}:{key} (cut off by truncation)")
        return
    if key is not None:
        yield Sample(key, members, path)


def _has_end_of_archive(path: str, offset: int) -> bool:
    """A tar cut at a 512-byte boundary reads as a shorter valid tar; only the two zero blocks that
    close every archive tell it apart. Compressed shards are checked by their codec instead."""
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b" or f.read(1) == b"":
            return True
        f.seek(offset)
        tail = f.read(1024)
    return len(tail) == 1024 and not tail.strip(b"\0")


def iter_samples(shards: Iterable[str] | str, stats: ShardStats | None = None, *,
                 decode_image: bool = True) -> Iterator[tuple[Sample, Image.Image | None]]:
    """(sample, RGB image) over shards; samples without a (decodable) image are skipped and counted."""
    stats = stats if stats is not None else ShardStats()
    paths = expand_shards(shards) if isinstance(shards, (str, os.PathLike)) else list(shards)
    for path in paths:
        for sample in iter_shard(path, stats):
            if sample.image_extension is None:
                stats.note("incomplete_samples", f"sample {sample.key!r} in {path} has no image",
                           f"{path}:{sample.key} (no image)")
                continue
            image = None
            if decode_image:
                try:
                    image = sample.image()
                except CorruptSample as exc:
                    stats.note("corrupt_images", str(exc), f"{path}:{sample.key} (image does not decode)")
                    continue
            stats.samples += 1
            yield sample, image


def encode_member(ext: str, value) -> bytes:
    """bytes as is; str as UTF-8; dict/list as JSON; a PIL image encoded by ``ext`` (png, jpg, webp)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if isinstance(value, Image.Image):
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(ext)
        if fmt is None:
            raise ValueError(f"cannot encode an image as member extension {ext!r}; use one of {IMAGE_EXTENSIONS}")
        buf = io.BytesIO()
        value.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()
    raise ValueError(f"member {ext!r}: cannot encode a {type(value).__name__}; pass bytes, str, dict or a PIL image")


class ShardWriter:
    """Write one shard atomically: members go to a temp file, renamed to ``path`` on ``close``.

    Used as a context manager, an exception discards the temp file and leaves no shard.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._keys: set[str] = set()
        self.count = 0

    def write(self, key: str, members: dict) -> None:
        if not key or "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} must be non-empty with no '.' in its file name "
                             "(the first dot starts the member extension)")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} written twice to {self.path}")
        self._keys.add(key)
        for ext, value in members.items():
            data = encode_member(ext, value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o644)  # mkstemp makes 0600
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)  # the rename itself survives a power cut

    def discard(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def remove_stale_temp_files(directory: str | os.PathLike, shard_name: str) -> int:
    """Delete temp files a killed writer of ``shard_name`` left in ``directory``; returns how many."""
    n = 0
    for p in Path(directory).glob(f".{shard_name}.*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n
