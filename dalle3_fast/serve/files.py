"""Generated PNGs kept for ``response_format=url``: unguessable ids, dropped after ``ttl_s``."""
from __future__ import annotations

import secrets
import threading
import time


class FileStore:
    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = 2 ** 30):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._files: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        file_id = secrets.token_urlsafe(18)
        now = time.monotonic()
        with self._lock:
            self._evict(now)
            self._files[file_id] = (now + self.ttl_s, data)
            total = sum(len(d) for _, d in self._files.values())
            for old in sorted(self._files, key=lambda k: self._files[k][0]):  # oldest first past the byte cap
                if total <= self.max_bytes:
                    break
                total -= len(self._files.pop(old)[1])
        return file_id

    def get(self, file_id: str) -> bytes | None:
        with self._lock:
            self._evict(time.monotonic())
            entry = self._files.get(file_id)
            return entry[1] if entry else None

    def _evict(self, now: float) -> None:
        for key in [k for k, (expires, _) in self._files.items() if expires <= now]:
            del self._files[key]
