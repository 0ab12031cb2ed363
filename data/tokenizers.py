"""Tokenizers: a byte-level default that needs no files (works offline), or any tokenizer.json.

Byte ids are 0..255; specials follow (256 = BOS/separator, 257 = PAD) so text is lossless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer as _Tok


class Tokenizer(Protocol):
    vocab_size: int
    sep_id: int

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids: np.ndarray | list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: every input byte maps to exactly one token."""

    name = "byte"
    vocab_size = 258
    sep_id = 256
    pad_id = 257

    def encode(self, text: str | bytes) -> np.ndarray:
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        arr = np.asarray(ids)
        return bytes(arr[arr < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` JSON tokenizer; the separator is its EOS-like token when one exists."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {p} does not exist; expected a tokenizer.json")
        self._tok = _Tok.from_file(str(p))
        self.name = str(p)
        self.vocab_size = self._tok.get_vocab_size()
        sep = None
        for cand in ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>"):
            sep = self._tok.token_to_id(cand)
            if sep is not None:
                break
        self.sep_id = sep if sep is not None else self.vocab_size - 1

    def encode(self, text: str | bytes) -> np.ndarray:
        s = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        ids = self._tok.encode(s, add_special_tokens=False).ids
        dtype = np.uint16 if self.vocab_size <= 65535 else np.uint32
        return np.asarray(ids, dtype=dtype)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    """`byte` or a path to a tokenizer.json."""
    if spec in ("", "byte"):
        return ByteTokenizer()
    return HFTokenizer(spec)
