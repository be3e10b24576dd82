"""The prompt through ComfyUI's CLIP (SD1.5's clip_l, SDXL's clip_l + clip_g): tokens, the class
words' positions, the encoding.

Token binding itself is pure (engine.prompt_tokens); this module only follows ComfyUI's
tokenizer API, so a ComfyUI change lands in one place."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..engine.bases import BASES, SD15
from ..engine.prompt_tokens import WordTokens, bind_streams
from .models import check_text_encoder_base


def _tokenizer(clip, stream: str):
    return getattr(clip.tokenizer, f"clip_{stream}")


def _ids(chunks: list) -> list[list[int]]:
    """Token ids per chunk; -1 for a textual-inversion embedding (a vector, not an id)."""
    return [[int(t[0]) if not torch.is_tensor(t[0]) else -1 for t in chunk] for chunk in chunks]


def token_chunks(clip, text: str, stream: str = "l") -> tuple[dict, list[list[int]]]:
    """(ComfyUI's tokens of `text`, the ids of one stream's chunks)."""
    tokens = clip.tokenize(text)
    return tokens, _ids(tokens[stream])


def word_tokens(clip, word: str, stream: str = "l") -> WordTokens:
    tok = _tokenizer(clip, stream)
    _, chunks = token_chunks(clip, word, stream)
    ids = chunks[0][tok.tokens_start:]
    end = tok.end_token
    ids = ids[: ids.index(end)] if end in ids else ids
    return WordTokens(word, tuple(ids))


@lru_cache(maxsize=1)
def _sd15_tokenizer_alone():
    import comfy.sd1_clip
    return comfy.sd1_clip.SD1Tokenizer().clip_l


def sd15_word_ids(word: str) -> tuple[int, ...]:
    """The CLIP token ids of `word` from the tokenizer every SD1.5 checkpoint's CLIP carries
    (ComfyUI's SD1Tokenizer), without loading a model: what a dataset validator checks class
    words against before any training."""
    tok = _sd15_tokenizer_alone()
    ids = [int(t[0]) for t in tok.tokenize_with_weights(word)[0]][tok.tokens_start:]
    return tuple(ids[: ids.index(tok.end_token)] if tok.end_token in ids else ids)


def describe(clip, chunks: list[list[int]], stream: str = "l") -> str:
    tok = _tokenizer(clip, stream)
    special = {tok.start_token, tok.end_token, getattr(tok, "pad_token", None)}
    ids = [t for c in chunks for t in c if t not in special and t >= 0]   # -1: a textual-inversion embedding
    words = tok.tokenizer.convert_ids_to_tokens(ids)
    return "[" + ", ".join(repr(w.replace("</w>", "")) for w in words) + "]"


@dataclass
class EncodedPrompt:
    conditioning: list                  # what CLIPTextEncode outputs
    positions: list[list[int]]          # per subject, its class word's rows in the encoded prompt
    chunks: int                         # 77-token chunks the prompt took

    @property
    def plain(self) -> torch.Tensor:
        """[L, D] the text-encoder output of the (first) conditioning entry (D: 768, SDXL 2048)."""
        return self.conditioning[0][0][0]


def encode_prompt(clip, text: str, class_words: list[str], base: str = SD15.name) -> EncodedPrompt:
    """Encode `text` exactly as CLIPTextEncode does and find each class word in it, in every text
    stream of `base` (refused when the CLIP is not `base`'s, or when its streams disagree)."""
    check_text_encoder_base(clip, base)
    streams = BASES[base].stream_names
    tokens = clip.tokenize(text)
    chunks = {s: _ids(tokens[s]) for s in streams}
    words = {s: [word_tokens(clip, w, s) for w in class_words] for s in streams}
    positions = bind_streams(chunks, words, describe_tokens=lambda s, c: describe(clip, c, s))
    return EncodedPrompt(clip.encode_from_tokens_scheduled(tokens), positions, len(chunks[streams[0]]))
