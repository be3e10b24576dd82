"""Memory measurements of one sampling step: peak RSS growth and the exact tensor high-water mark.

- `PeakRSS.measure` records the process's RSS before a block and its peak inside it (VmHWM,
  reset through /proc/self/clear_refs; else a psutil sampling thread). glibc's heap makes it
  vary by tens of MiB between repeats of the same step: a rough guide.
- `live_tensor_peak_mode()` is a TorchDispatchMode counting the bytes of the tensor storages
  allocated inside it that are still alive: exact and deterministic, but it puts a Python hook
  on every op (too slow for the timed steps) and does not see workspaces inside kernels.
"""
from __future__ import annotations

import ctypes
import gc
import threading
import weakref
from contextlib import contextmanager

_libc = None


def trim_heap() -> None:
    """Give freed heap pages back to the OS so the next step's RSS growth is its own."""
    global _libc
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def status_bytes(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_after_trim() -> int:
    trim_heap()
    return status_bytes("VmRSS")


def human(n: float) -> str:
    """Bytes for people: 512 B, 9.9 MiB, -1.2 GiB."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n}"


class PeakRSS:
    """Peak RSS over a block: VmHWM reset by /proc/self/clear_refs (exact), else a psutil
    sampling thread (5 ms)."""

    def __init__(self) -> None:
        self.exact = self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @contextmanager
    def measure(self, out: dict):
        """Sets out["rss_before"] and out["rss_peak"] (bytes)."""
        out["rss_before"] = rss0 = rss_after_trim()
        if self.exact:
            self._reset_hwm()
            yield
            out["rss_peak"] = status_bytes("VmHWM")
            return
        import psutil
        proc, peak, stop = psutil.Process(), [rss0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                stop.wait(0.005)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
        out["rss_peak"] = peak[0]


def live_tensor_peak_mode():
    """A TorchDispatchMode whose `peak` is the high-water mark of the bytes of tensor storages
    allocated while it is active and still alive (unlike RSS, exact and deterministic).
    Kernel-internal workspaces (e.g. inside SDPA) are not seen; they are the same for the prior
    and the expert."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def key_of(t):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None, 0
        return (st.data_ptr(), t.device), st.nbytes()

    class LiveTensorPeak(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict = {}        # storage key -> [python tensors alive, nbytes]
            self.live = 0
            self.peak = 0

        def _release(self, key) -> None:
            e = self.refs.get(key)
            if e is not None:
                e[0] -= 1
                if e[0] == 0:
                    self.live -= e[1]
                    del self.refs[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = None
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                key, n = key_of(t)
                if key is None or n == 0 or key[0] == 0:
                    continue
                e = self.refs.get(key)
                if e is None:
                    if inputs is None:       # a view of / in-place on an untracked input: no new memory
                        inputs = {key_of(a)[0] for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
                    if key in inputs:
                        continue
                    e = self.refs[key] = [0, n]
                    self.live += n
                    self.peak = max(self.peak, self.live)
                e[0] += 1
                weakref.finalize(t, self._release, key)
            return out

    return LiveTensorPeak()
