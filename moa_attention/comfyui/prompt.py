"""The prompt through ComfyUI's SD1.5 CLIP: tokens, the class words' positions, the encoding.

Token binding itself is pure (engine.prompt_tokens); this module only follows ComfyUI's
tokenizer API, so a ComfyUI change lands in one place."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..engine.prompt_tokens import WordTokens, bind_subjects
from .models import sd15_tokenizer


def token_chunks(clip, text: str) -> tuple[dict, list[list[int]]]:
    sd15_tokenizer(clip)
    tokens = clip.tokenize(text)
    chunks = [[int(t[0]) if not torch.is_tensor(t[0]) else -1 for t in chunk] for chunk in tokens["l"]]
    return tokens, chunks


def word_tokens(clip, word: str) -> WordTokens:
    tok = sd15_tokenizer(clip)
    _, chunks = token_chunks(clip, word)
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


def describe(clip, chunks: list[list[int]]) -> str:
    tok = sd15_tokenizer(clip)
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
        """[L, 768] the text-encoder output of the (first) conditioning entry."""
        return self.conditioning[0][0][0]


def encode_prompt(clip, text: str, class_words: list[str]) -> EncodedPrompt:
    """Encode `text` exactly as CLIPTextEncode does and find each class word in it."""
    tokens, chunks = token_chunks(clip, text)
    words = [word_tokens(clip, w) for w in class_words]
    positions = bind_subjects(chunks, words, describe_tokens=lambda c: describe(clip, c))
    return EncodedPrompt(clip.encode_from_tokens_scheduled(tokens), positions, len(chunks))
