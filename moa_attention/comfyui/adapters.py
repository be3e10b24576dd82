"""ComfyUI's side of a loaded adapter: its file name, its ModelPatchers and a bounded cache.

The engine's MoAAdapter is a plain nn.Module; what ComfyUI needs around it lives in a
LoadedAdapter (the MOA_ADAPTER value that flows through the graph) instead of being stashed
on the module; only a bare adapter handed to apply_moa carries its own (as_loaded says why).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

from ..engine.adapter import MoAAdapter
from ..engine.adapter_file import load_adapter

#: adapters kept in memory by MoA Adapter Loader (each is 20-400 MB); the oldest is dropped first
CACHE_SIZE = 4


@dataclass(eq=False)
class LoadedAdapter:
    adapter: MoAAdapter
    name: str = "adapter"
    _patchers: dict = field(default_factory=dict, repr=False)

    @property
    def config(self):
        return self.adapter.config

    def patcher(self, load_device, offload_device):
        """One ModelPatcher per adapter and device pair.

        ComfyUI tracks loaded models through their patchers: a fresh patcher per MoA Apply
        would die with its clone while the (cached) adapter lives on, which ComfyUI reports as
        a memory leak and answers with a full garbage collection on every run."""
        import comfy.model_patcher
        key = (str(load_device), str(offload_device))
        if key not in self._patchers:
            self._patchers[key] = comfy.model_patcher.ModelPatcher(self.adapter, load_device=load_device,
                                                                   offload_device=offload_device)
        return self._patchers[key]


#: where a bare MoAAdapter keeps its LoadedAdapter (see as_loaded)
_BARE_KEY = "_comfyui_moa_loaded"


def as_loaded(adapter: MoAAdapter | LoadedAdapter, name: str = "adapter") -> LoadedAdapter:
    """The LoadedAdapter of `adapter`; a bare MoAAdapter (the Python API) gets one, once.

    Repeated apply_moa calls with one bare adapter must share its ModelPatcher (see `patcher`),
    so the LoadedAdapter must live exactly as long as the adapter. It is kept on the adapter
    itself: a global table, weak-keyed or not, would hold it through the patcher (which holds
    the adapter) forever, and a weak value would let it die while the adapter lives. On the
    module it is a reference cycle the garbage collector frees with the adapter."""
    if isinstance(adapter, LoadedAdapter):
        return adapter
    loaded = adapter.__dict__.get(_BARE_KEY)
    if loaded is None:
        loaded = LoadedAdapter(adapter, name)
        object.__setattr__(adapter, _BARE_KEY, loaded)
    return loaded


class AdapterCache:
    """Adapters by path, reloaded when the file changes, at most `size` kept."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[tuple[int, int], LoadedAdapter]] = OrderedDict()

    def get(self, path: str, name: str) -> LoadedAdapter:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        entry = self._entries.get(path)
        if entry is None or entry[0] != stamp:
            entry = (stamp, LoadedAdapter(load_adapter(path), name))
            self._entries[path] = entry
        self._entries.move_to_end(path)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry[1]
