"""Token-aware chunking with overlap.

Chunks are measured in the embedding model's own tokens, so none is silently truncated by the
embedder. A chunk ends at the last sentence boundary in its second half when there is one, and
the next chunk starts ``overlap`` tokens before that end, so a fact that straddles a boundary is
whole in at least one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

_SENTENCE_END = (".", "?", "!", ";", "\n")


class Encoding(Protocol):
    offsets: list[tuple[int, int]]


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> Encoding: ...


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    token_start: int
    token_end: int  # exclusive


class Chunker:
    def __init__(self, tokenizer: TokenizerLike, max_tokens: int = 200, overlap: int = 32):
        if max_tokens < 8:
            raise ValueError("max_tokens must be at least 8")
        if not 0 <= overlap < max_tokens // 2:
            raise ValueError("overlap must be in [0, max_tokens / 2)")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = overlap

    def chunk(self, text: str) -> list[Chunk]:
        offsets = [
            o for o in self.tokenizer.encode(text, add_special_tokens=False).offsets if o[1] > o[0]
        ]
        n = len(offsets)
        if n == 0:
            return [Chunk(0, text, 0, 0)] if text.strip() else []
        chunks: list[Chunk] = []
        start = 0
        while True:
            end = min(start + self.max_tokens, n)
            if end < n:
                end = self._sentence_end(text, offsets, start, end)
            chunk_text = text[offsets[start][0] : offsets[end - 1][1]].strip()
            chunks.append(Chunk(len(chunks), chunk_text, start, end))
            if end >= n:
                return chunks
            start = max(end - self.overlap, start + 1)

    def _sentence_end(self, text: str, offsets: list[tuple[int, int]], start: int, end: int) -> int:
        """Last token boundary in (start + half, end] that closes a sentence, else ``end``."""
        floor = start + self.max_tokens // 2
        for i in range(end - 1, floor - 1, -1):
            token_text = text[offsets[i][0] : offsets[i][1]]
            following = text[offsets[i][1] : offsets[i][1] + 1]
            if token_text.endswith(_SENTENCE_END) or following == "\n":
                return i + 1
        return end
