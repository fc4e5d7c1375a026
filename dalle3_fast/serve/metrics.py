"""Serving metrics: queue depth, batch size histogram, images/s, request latency percentiles.

``snapshot()`` is the JSON form; ``prometheus()`` the text exposition format (``GET /metrics?format=prometheus``
or ``Accept: text/plain``).
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATE_WINDOW_S = 60.0
LATENCY_SAMPLES = 2048


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.queue_depth = 0
        self.requests = 0
        self.errors: dict[int, int] = {}
        self.images = 0
        self.batches = 0
        self.batch_sizes: dict[int, int] = {}      # exact images-per-call counts
        self.cancelled = 0
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._image_times: deque[tuple[float, int]] = deque()

    def set_queue_depth(self, depth: int) -> None:
        with self._lock:
            self.queue_depth = depth

    def record_batch(self, images: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.batches += 1
            self.images += images
            self.batch_sizes[images] = self.batch_sizes.get(images, 0) + 1
            self._image_times.append((now, images))

    def record_request(self, latency_s: float, status: int = 200) -> None:
        with self._lock:
            self.requests += 1
            if status == 200:
                self._latencies.append(latency_s)
            else:
                self.errors[status] = self.errors.get(status, 0) + 1

    def record_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def _images_per_s(self, now: float) -> float:
        while self._image_times and self._image_times[0][0] < now - RATE_WINDOW_S:
            self._image_times.popleft()
        window = min(RATE_WINDOW_S, max(now - self.started, 1e-3))
        return sum(n for _, n in self._image_times) / window

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self._lock:
            lat = np.array(self._latencies, dtype=np.float64)
            pct = ({f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)} if lat.size
                   else {"p50": None, "p90": None, "p99": None})
            histogram = {f"le_{b}": sum(c for s, c in self.batch_sizes.items() if s <= b) for b in BATCH_BUCKETS}
            histogram["le_inf"] = self.batches
            return {
                "uptime_s": now - self.started, "queue_depth": self.queue_depth, "requests": self.requests,
                "errors": {str(k): v for k, v in sorted(self.errors.items())}, "cancelled": self.cancelled,
                "images": self.images, "batches": self.batches, "images_per_s": self._images_per_s(now),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "batch_size_histogram": histogram,
                "max_batch_size": max(self.batch_sizes, default=0),
                "latency_s": {**pct, "count": int(lat.size)},
            }

    def prometheus(self) -> str:
        s = self.snapshot()
        lines = [
            "# TYPE dalle3_queue_depth gauge", f"dalle3_queue_depth {s['queue_depth']}",
            "# TYPE dalle3_requests_total counter", f"dalle3_requests_total {s['requests']}",
            "# TYPE dalle3_cancelled_total counter", f"dalle3_cancelled_total {s['cancelled']}",
            "# TYPE dalle3_images_total counter", f"dalle3_images_total {s['images']}",
            "# TYPE dalle3_images_per_second gauge", f"dalle3_images_per_second {s['images_per_s']:.6g}",
            "# TYPE dalle3_batch_size histogram",
        ]
        for b in BATCH_BUCKETS:
            lines.append(f'dalle3_batch_size_bucket{{le="{b}"}} {s["batch_size_histogram"][f"le_{b}"]}')
        lines.append(f'dalle3_batch_size_bucket{{le="+Inf"}} {s["batches"]}')
        with self._lock:
            total = sum(k * v for k, v in self.batch_sizes.items())
        lines += [f"dalle3_batch_size_sum {total}", f"dalle3_batch_size_count {s['batches']}",
                  "# TYPE dalle3_request_latency_seconds summary"]
        for q, label in ((50, "0.5"), (90, "0.9"), (99, "0.99")):
            value = s["latency_s"][f"p{q}"]
            shown = value if value is not None else "NaN"
            lines.append(f'dalle3_request_latency_seconds{{quantile="{label}"}} {shown}')
        lines.append(f"dalle3_request_latency_seconds_count {s['latency_s']['count']}")
        lines.append("# TYPE dalle3_errors_total counter")
        for status, count in s["errors"].items():
            lines.append(f'dalle3_errors_total{{status="{status}"}} {count}')
        return "\n".join(lines) + "\n"
