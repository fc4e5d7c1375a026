"""Backend choice: ``use_backend`` forces a backend for the calling thread only."""
from __future__ import annotations

import collections
import threading

import pytest
import torch

import dalle3_fast.ops as ops
from dalle3_fast.ops import reference

# Backends that run CPU tensors (Triton through its interpreter, when conftest switched it on).
CPU_TENSOR_BACKENDS = ("reference", "cpu", "triton")


def test_use_backend_is_per_thread(monkeypatch):
    """Two threads force different backends at once; each sees, and runs, only its own on every call."""
    names = [b for b in CPU_TENSOR_BACKENDS if b in ops.available_backends()][:2]
    if len(names) < 2:
        pytest.skip(f"needs two live backends for CPU tensors, have {names}")
    reference_calls = collections.Counter()
    real_reference = reference.group_norm_silu

    def counting_reference(*args, **kwargs):
        reference_calls[threading.current_thread().name] += 1
        return real_reference(*args, **kwargs)

    monkeypatch.setattr(reference, "group_norm_silu", counting_reference)
    x, weight, bias = torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(8)
    rounds = 25
    barrier = threading.Barrier(len(names))
    seen: dict[str, list] = {}
    errors: list[BaseException] = []

    def worker(name: str):
        try:
            log = [ops.forced_backend()]
            with ops.use_backend(name):
                for _ in range(rounds):
                    barrier.wait(timeout=60)  # both threads are inside their blocks here
                    log.append(ops.forced_backend())
                    ops.group_norm_silu(x, weight, bias, 2)
                    barrier.wait(timeout=60)
                    log.append(ops.forced_backend())
            log.append(ops.forced_backend())
            seen[name] = log
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    with ops.use_backend(names[0]):  # the main thread's choice does not leak into the workers either
        threads = [threading.Thread(target=worker, args=(n,), name=n) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert ops.forced_backend() == names[0]
    assert ops.forced_backend() is None
    if errors:
        raise errors[0]
    for name in names:
        assert seen[name] == [None] + [name] * (2 * rounds) + [None], f"thread {name} saw {seen[name]}"
        expected = rounds if name == "reference" else 0
        assert reference_calls[name] == expected, f"thread {name} ran the reference {reference_calls[name]} times"


def test_use_backend_nests_and_restores():
    live = ops.available_backends()
    with ops.use_backend("reference"):
        if "cpu" in live:
            with ops.use_backend("cpu"):
                assert ops.forced_backend() == "cpu"
        assert ops.forced_backend() == "reference"
    assert ops.forced_backend() is None
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("tpu"):
            pass
    assert ops.forced_backend() is None
