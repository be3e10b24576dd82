"""Find each subject's class word among the prompt's CLIP tokens.

Works on token ids as ComfyUI's CLIP tokenizers produce them (SD1.5's clip_l; SDXL's clip_l and
clip_g, one list each, bound together by bind_streams): a list of 77-token chunks
(start token, up to 75 prompt tokens, end/padding), so a prompt longer than 77 tokens and
prompt weighting like "(man:1.2)" (which changes weights, not ids) need no special case.
A position is an index into the flattened chunks, i.e. the row of the encoded prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ClassWordError


@dataclass(frozen=True)
class WordTokens:
    word: str
    ids: tuple[int, ...]


def flatten(chunks: list[list[int]]) -> list[int]:
    return [t for chunk in chunks for t in chunk]


def occurrences(chunks: list[list[int]], word: WordTokens) -> list[list[int]]:
    """Every place the word's token sequence appears, as lists of flattened positions."""
    ids = flatten(chunks)
    n = len(word.ids)
    if n == 0:
        return []
    return [list(range(i, i + n)) for i in range(len(ids) - n + 1) if tuple(ids[i:i + n]) == word.ids]


def bind_subjects(chunks: list[list[int]], words: list[WordTokens],
                  describe_tokens=None) -> list[list[int]]:
    """Positions for each subject, in order. The k-th subject naming a word takes the word's
    k-th occurrence, so "a man and a man" binds two "man" subjects left to right."""
    used: dict[tuple[int, ...], int] = {}
    bound = []
    for word in words:
        found = occurrences(chunks, word)
        k = used.get(word.ids, 0)
        if not found:
            shown = describe_tokens(chunks) if describe_tokens else flatten(chunks)
            raise ClassWordError(
                f"the class word '{word.word}' is not in the prompt. Write it in the prompt (e.g. 'a photo of a "
                f"{word.word} ...') or change the subject's class_word. The prompt's tokens are: {shown}")
        if k >= len(found):
            raise ClassWordError(
                f"{k + 1} subjects use the class word '{word.word}' but the prompt names it only {len(found)} "
                f"time(s). Mention '{word.word}' once per subject (e.g. 'a {word.word} and a {word.word}')")
        used[word.ids] = k + 1
        bound.append(found[k])
    return bound


def bind_streams(chunks: dict[str, list[list[int]]], words: dict[str, list[WordTokens]],
                 describe_tokens=None) -> list[list[int]]:
    """Positions for each subject in a prompt tokenized once per text encoder (SDXL: 'l' and 'g').

    The encoders' outputs sit side by side in each row, so a class word must be at the same rows
    in every stream; an embedding known to one encoder only shifts the other's tokens, and the
    fused token would then mix one word with another. `describe_tokens(stream, chunks)` shows a
    stream's tokens in the messages."""
    bound: dict[str, list[list[int]]] = {}
    for stream, stream_chunks in chunks.items():
        show = (lambda c, s=stream: describe_tokens(s, c)) if describe_tokens else None
        bound[stream] = bind_subjects(stream_chunks, words[stream], describe_tokens=show)
    first, *others = bound
    lengths = {stream: len(flatten(c)) for stream, c in chunks.items()}
    for other in others:
        disagree = [i for i, (a, b) in enumerate(zip(bound[first], bound[other])) if a != b]
        if disagree or lengths[first] != lengths[other]:
            i = disagree[0] if disagree else 0
            word = words[first][i].word if words[first] else ""
            where = (f"the class word '{word}' is at rows {bound[first][i]} of clip_{first} but rows "
                     f"{bound[other][i]} of clip_{other}") if disagree else (
                f"clip_{first} has {lengths[first]} tokens but clip_{other} has {lengths[other]}")
            raise ClassWordError(
                f"the prompt's text encoders disagree: {where}. An embedding (embedding:name) made for one of "
                f"them only shifts the other's tokens; use an embedding with weights for both (clip_{first} and "
                f"clip_{other}) or remove it from the prompt")
    return bound[first]
