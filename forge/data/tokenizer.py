"""Character-level tokenizer for the built-in tasks; it travels with the model (to_dict/from_dict).

Ids: the special tokens first (<pad> = 0, <bos>, <eos>, <sep>), then one id per character, then
special tokens added later ("<think>", "</think>", ...). Added tokens go at the end so every
existing id stays the same: a trained model only needs new embedding rows. A special token
written literally in the text ("<think>") encodes as its single id, so prompts can carry them.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

DEFAULT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*=%(),.?:"
_SPECIAL_FORM = re.compile(r"^<[^<>\s]+>$")


class CharTokenizer:
    """One id per character of `chars`, plus the special tokens (which always come first)."""

    PAD, BOS, EOS, SEP = "<pad>", "<bos>", "<eos>", "<sep>"

    def __init__(self, chars: str = DEFAULT_CHARS, special: Sequence[str] = (PAD, BOS, EOS, SEP)):
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"Invalid chars: {chars!r}; expected a non-empty string")
        if len(set(chars)) != len(chars):
            raise ValueError(f"Invalid chars: {chars!r}; every character must appear once")
        if "<" in chars or ">" in chars:
            raise ValueError("Invalid chars: '<' and '>' are reserved for special tokens")
        special = list(special)
        if special[:4] != [self.PAD, self.BOS, self.EOS, self.SEP]:
            raise ValueError(f"Invalid special: {special!r}; must start with {self.PAD}, {self.BOS}, "
                             f"{self.EOS}, {self.SEP} in that order")
        self._check_special_names(special)
        self._chars = chars
        self._leading = special            # specials before the characters
        self._added: list[str] = []        # specials added later, after the characters
        self._rebuild()

    # ---- vocabulary -------------------------------------------------------------------------
    def _rebuild(self) -> None:
        vocab = self._leading + list(self._chars) + self._added
        if len(set(vocab)) != len(vocab):
            raise ValueError(f"Duplicate tokens in the vocabulary: {vocab!r}")
        self._id_of = {tok: i for i, tok in enumerate(vocab)}
        self._token_of = vocab
        self._special = self._leading + self._added
        self._special_ids = frozenset(self._id_of[t] for t in self._special)
        # longest first, so "</think>" is matched before a shorter token that prefixes it
        self._special_by_length = sorted(self._special, key=len, reverse=True)

    def _check_special_names(self, tokens: Iterable[str]) -> None:
        for tok in tokens:
            if not isinstance(tok, str) or not _SPECIAL_FORM.match(tok):
                raise ValueError(f"Invalid special token: {tok!r}; expected the form '<name>' "
                                 "(no spaces, no nested '<' or '>')")

    @property
    def vocab_size(self) -> int:
        return len(self._token_of)

    @property
    def special_tokens(self) -> list[str]:
        return list(self._special)

    pad_id = property(lambda self: self._id_of[self.PAD])
    bos_id = property(lambda self: self._id_of[self.BOS])
    eos_id = property(lambda self: self._id_of[self.EOS])
    sep_id = property(lambda self: self._id_of[self.SEP])

    def token_id(self, token: str) -> int:
        """The id of one character or special token."""
        if token not in self._id_of:
            raise ValueError(f"Unknown token: {token!r}")
        return self._id_of[token]

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add special tokens (e.g. "<think>", "</think>") at the end of the vocabulary and return
        their ids in `tokens` order. Tokens already present keep their id; no other id changes."""
        tokens = list(tokens)
        self._check_special_names(tokens)
        self._added.extend(t for t in dict.fromkeys(tokens) if t not in self._id_of)
        self._rebuild()
        return [self._id_of[t] for t in tokens]

    # ---- encode / decode --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text become one id each."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                tok = next((s for s in self._special_by_length if text.startswith(s, i)), None)
                if tok is None:
                    raise ValueError(f"Unknown special token at position {i} of {text!r}; known: "
                                     f"{self._special}")
                ids.append(self._id_of[tok])
                i += len(tok)
                continue
            if text[i] not in self._id_of:
                raise ValueError(f"Unknown character {text[i]!r} at position {i} of {text!r}; "
                                 f"allowed characters: {self._chars!r}")
            ids.append(self._id_of[text[i]])
            i += 1
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids` (a list or 1-D tensor); with skip_special, special tokens are left out."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"Unknown token id: {i!r}; expected an int in [0, {self.vocab_size})")
            if not (skip_special and i in self._special_ids):
                out.append(self._token_of[i])
        return "".join(out)

    # ---- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "char", "chars": self._chars, "special": list(self._leading),
                "added": list(self._added)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        if not isinstance(d, dict) or d.get("type") != "char":
            raise ValueError(f"Invalid tokenizer dict: expected {{'type': 'char', ...}}, got {d!r}")
        missing = {"chars", "special"} - set(d)
        if missing:
            raise ValueError(f"Invalid tokenizer dict: missing keys {sorted(missing)}")
        tok = cls(chars=d["chars"], special=d["special"])
        tok.add_special_tokens(d.get("added", []))
        return tok

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, special={self._special})"
