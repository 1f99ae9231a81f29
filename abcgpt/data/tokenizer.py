"""Tokenizers: characters (default; one vocabulary over all sources) or GPT-2 BPE via tiktoken.

Both are saved into checkpoints as plain dicts (to_dict / tokenizer_from_dict), so a
checkpoint decodes what it generates without the training data.
"""
from abcgpt.core.errors import UserError


class UnknownCharactersError(UserError, ValueError):
    """Text with characters the vocabulary lacks."""


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        if len(self.stoi) != len(self.chars):
            raise ValueError("character vocabulary has repeated characters")

    @classmethod
    def from_texts(cls, texts):
        return cls(sorted(set().union(*(set(t) for t in texts))))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            missing = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(repr(ch) for ch in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise UnknownCharactersError(
                f"{len(missing)} character(s) not in the vocabulary: {shown}"
            ) from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def to_dict(self):
        return {"kind": self.kind, "chars": "".join(self.chars)}


class VocabularyError(UserError, RuntimeError):
    """A tokenizer's vocabulary that cannot be had (GPT-2's files out of reach)."""


class BPETokenizer:
    """GPT-2 byte-pair encoding; needs tiktoken (and its vocabulary files, cached or downloaded)."""

    kind = "bpe"

    def __init__(self, name="gpt2", encoding=None):
        if encoding is None:
            import tiktoken

            try:
                encoding = tiktoken.get_encoding(name)
            except Exception as e:  # tiktoken fetches its files on first use
                raise VocabularyError(
                    f"could not load the {name!r} BPE vocabulary ({e}). Offline? Point "
                    "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached files, or use the "
                    "character tokenizer."
                ) from None
        self.name = name
        self.encoding = encoding

    @property
    def vocab_size(self):
        return self.encoding.n_vocab

    def encode(self, text):
        return self.encoding.encode_ordinary(text)  # text is data: special tokens stay plain text

    def decode(self, ids):
        return self.encoding.decode(list(ids))

    def to_dict(self):
        return {"kind": self.kind, "name": self.name}


class TextStream:
    """Text of tokens that arrive one at a time, given out in whole characters: a byte-pair token can end
    inside a character (an emoji, a curly quote), and its bytes wait for the tokens that complete it. The
    pieces given out join into the text the tokens decode to all at once."""

    HOLD = 4  # a character is at most 4 bytes, so at most 4 tokens can hold one unfinished

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def feed(self, ids) -> str:
        """The text that the tokens so far complete, not given out before: the pending tokens but the last few
        that end inside a character."""
        self.pending += list(ids)
        n = len(self.pending)
        for keep in range(min(n, self.HOLD) + 1):
            text = self.tokenizer.decode(self.pending[:n - keep]) if keep < n else ""
            if keep == n or not text.endswith("\ufffd"):
                break
        else:  # no cut in the last HOLD tokens ends a character: the one before them is broken for good
            keep, text = self.HOLD, self.tokenizer.decode(self.pending[:n - self.HOLD])
        self.pending = self.pending[n - keep:]
        return text

    def flush(self) -> str:
        """Whatever is left, as it decodes."""
        text, self.pending = self.tokenizer.decode(self.pending) if self.pending else "", []
        return text


def tokenizer_from_dict(d):
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    if d.get("kind") == "bpe":
        return BPETokenizer(d["name"])
    raise ValueError(f"unknown tokenizer {d.get('kind')!r}")
