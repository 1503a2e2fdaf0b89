"""CLIP's byte-level BPE tokenizer, reading the vocabulary file of a shop-seg model directory.

Follows the tokenizer of OpenAI CLIP (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision"; github.com/openai/CLIP ``simple_tokenizer.py``), which ModelScope's
``models/cv/shop_segmentation/utils.py`` uses with ``bpe_simple_vocab_16e6.txt.gz``.

One difference: the reference cleans text with ``ftfy.fix_text`` (mojibake repair, Unicode fixes),
which is not a vbatch dependency. We do NFC normalisation, double HTML unescaping and whitespace
collapsing, which agrees with ftfy on ordinary text and on the only prompts the model uses
(``others`` and ``foregeound``; the test checks them against the reference).
"""

from __future__ import annotations

import gzip
import html
import itertools
import logging
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

logger = logging.getLogger(__name__)

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (vocabulary size 49408 with the 256
# bytes, their end-of-word twins and the two special tokens).
_MAX_MERGES = 49152 - 256 - 2

# Words: the special tokens, English contractions, runs of letters, single digits, runs of other
# non-space symbols (CLIP's pattern; needs the `regex` module for \p{...}).
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, …) are
    moved to code points 256, 257, … in byte order, so that BPE never sees whitespace. The dict's
    order (printable bytes, then the others) is the order of the first 256 vocabulary entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable bytes first) is the vocabulary's order


def clean_text(text: str) -> str:
    """Normalise like CLIP (minus ftfy): NFC, HTML entities twice, collapsed whitespace, lower case."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()  # `regex`'s \s, as CLIP (not str.split's)


class ClipTokenizer:
    """Byte-level BPE with CLIP's vocabulary layout.

    Args:
        vocab_path: ``bpe_simple_vocab_16e6.txt.gz`` (a header line, then one merge ``"a b"`` per line).
    """

    def __init__(self, vocab_path: str | Path) -> None:
        lines = gzip.open(vocab_path, "rt", encoding="utf-8").read().split("\n")
        # kept as CLIP reads them, a blank trailing line of a short file included, so that ids agree
        merges = [tuple(line.split()) for line in lines[1 : _MAX_MERGES + 1]]
        base = list(byte_alphabet().values())
        vocab = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of one byte-mapped word, lowest merge rank first."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(itertools.pairwise(symbols))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the start/end tokens."""
        alphabet = byte_alphabet()
        ids: list[int] = []
        for word in _WORD_RE.findall(clean_text(text)):
            if word in (SOT, EOT):
                ids.append(self.encoder[word])
                continue
            mapped = "".join(alphabet[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(mapped))
        return ids

    def __call__(self, texts: list[str], context_length: int) -> np.ndarray:
        """CLIP's ``tokenize(..., truncate=True)``.

        Args:
            texts: K strings.
            context_length: padded length L.

        Returns:
            (K, L) int64: ``[SOT, ids..., EOT, 0, ...]``; a too-long text is cut and ends with EOT.
        """
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                ids = [*ids[: context_length - 1], self.eot_id]
            out[row, : len(ids)] = ids
        return out
