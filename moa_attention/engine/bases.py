"""The base models MoA knows: what each feeds its cross-attention and how it is recognised.

One table instead of widths scattered over the format reader, the model checks and the
trainer: a base's text streams (ComfyUI's names for its text encoders, each with its output
width; the cross-attention context is their concatenation), the width of its `y` vector
(ComfyUI's `adm_in_channels`: SDXL's pooled text + size embeddings), and the resolution it was
trained at. `supported` says whether this version of the pack runs MoA on it; the others are
listed so that they are refused by name, never by a shape error deep in a layer.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Base:
    name: str                                 # as written in an adapter's `moa.base`
    label: str                                # as the user reads it
    text_streams: tuple[tuple[str, int], ...]  # (stream, width), in the context's order
    y_dim: int | None                         # ComfyUI's adm_in_channels; None: the UNet takes no `y`
    resolution: int                           # default training / sampling size in pixels
    supported: bool                           # this pack runs MoA on it

    @property
    def context_dim(self) -> int:
        """The cross-attention context width: every text stream side by side."""
        return sum(width for _, width in self.text_streams)

    @property
    def stream_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.text_streams)

    def describe(self) -> str:
        y = f", y {self.y_dim}" if self.y_dim else ""
        return f"{self.label} (context {self.context_dim}{y})"


SD15 = Base("sd15", "SD1.5", (("l", 768),), None, 512, True)
SDXL = Base("sdxl", "SDXL", (("l", 768), ("g", 1280)), 2816, 1024, True)
#: a separate model of its own: refused by name wherever a base would be accepted
SDXL_REFINER = Base("sdxl_refiner", "SDXL refiner", (("g", 1280),), 2560, 1024, False)

#: bases an adapter file may name
BASES: dict[str, Base] = {b.name: b for b in (SD15, SDXL)}
#: every model recognised by its shape, the refiner included
KNOWN_MODELS: tuple[Base, ...] = (SD15, SDXL, SDXL_REFINER)


def supported_labels() -> str:
    """'SD1.5 or SDXL': what the messages tell users to load instead."""
    return " or ".join(b.label for b in BASES.values() if b.supported)


def base_of_unet(context_dim: int | None, adm_in_channels: int | None) -> Base | None:
    """The known base with this cross-attention width and `y` width, or None (SD2, SD3, ...)."""
    for base in KNOWN_MODELS:
        if base.context_dim == context_dim and (base.y_dim or None) == (adm_in_channels or None):
            return base
    return None


def base_of_text_streams(streams: dict[str, int]) -> Base | None:
    """The known base whose text encoders are exactly `streams` (name -> width), or None."""
    for base in KNOWN_MODELS:
        if dict(base.text_streams) == streams:
            return base
    return None


__all__ = ["BASES", "Base", "KNOWN_MODELS", "SD15", "SDXL", "SDXL_REFINER", "base_of_text_streams",
           "base_of_unet", "supported_labels"]
