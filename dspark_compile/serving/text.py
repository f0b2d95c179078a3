"""Text in, text out with the target checkpoint's own ``tokenizer.json`` (Hugging Face ``tokenizers``).

:class:`TextStream` turns the token ids a request commits, round by round, into text that is final: a
multi-byte UTF-8 character whose bytes arrive in two rounds comes out once, whole, in the second; a stop string
is cut (with everything after it) even when it spans rounds, so text that might begin one is held back until
it is known not to; an EOS id ends the stream and is not shown.

Detokenization keeps two offsets into the ids (the ``prefix_offset``/``read_offset`` scheme of Hugging Face
text-generation-inference and vLLM): the text of ``ids[prefix:]`` minus that of ``ids[prefix:read]`` is new,
unless it ends in U+FFFD (an incomplete character). Decoding with a few earlier ids as context keeps decoders
that drop a leading space (Metaspace) right, and the cost per round stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark_compile.errors import BackendUnavailableError, UsageError

TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class TextCodec:
    """A checkpoint's tokenizer; encode prompts, decode ids (special tokens such as EOS are not shown)."""

    tokenizer: Any  # tokenizers.Tokenizer
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> TextCodec:
        """``path``: a ``tokenizer.json`` or a directory holding one (a Hugging Face checkpoint)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise UsageError(f"{file}: no tokenizer; text requests need the target checkpoint's {TOKENIZER_FILE} "
                             "(send token ids instead)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailableError("package `tokenizers` is not importable; `pip install tokenizers` "
                                          "for text in and out") from None
        try:
            return cls(Tokenizer.from_file(str(file)), file)
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise UsageError(f"{file}: not a Hugging Face tokenizer file ({exc})") from None

    @classmethod
    def find(cls, directory: str | Path) -> TextCodec | None:
        """The codec of a directory that may hold ``tokenizer.json``; None when it holds none."""
        return cls.load(directory) if (Path(directory) / TOKENIZER_FILE).is_file() else None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        found = self.tokenizer.token_to_id(token)
        return None if found is None else int(found)


@dataclass
class TextStream:
    """One request's output text, pushed round by round; see the module docstring.

    ``finish_reason`` becomes ``"stop"`` (a stop string), ``"eos"`` or, after :meth:`close`, ``"length"``;
    ``tokens`` counts the ids consumed (the EOS id included, ids after a stop or EOS not).
    """

    codec: TextCodec
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    finish_reason: str | None = field(default=None, init=False)
    tokens: int = field(default=0, init=False)
    _ids: list[int] = field(default_factory=list, init=False, repr=False)
    _prefix: int = field(default=0, init=False, repr=False)
    _read: int = field(default=0, init=False, repr=False)
    _held: str = field(default="", init=False, repr=False)  # decoded text not yet emitted (may start a stop)

    def __post_init__(self) -> None:
        self.stop = tuple(s for s in self.stop if s)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, ids: Iterable[int]) -> str:
        """Consume one round's ids; return the text that is now final (possibly empty)."""
        if self.finished:
            return ""
        for t in ids:
            self.tokens += 1
            if int(t) in self.eos_token_ids:
                self.finish_reason = "eos"
                break
            self._ids.append(int(t))
        self._held += self._decode_new(final=self.finished)
        return self._release(final=self.finished)

    def close(self) -> str:
        """The request ended (max tokens, EOS or cancel): flush what is held, incomplete characters as U+FFFD."""
        if self.finish_reason == "stop":
            return ""
        self._held += self._decode_new(final=True)
        text = self._release(final=True)
        if self.finish_reason is None:
            self.finish_reason = "length"
        return text

    def _decode_new(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self.codec.decode(self._ids[self._prefix:self._read])
        after = self.codec.decode(self._ids[self._prefix:])
        if not final and (after.endswith(REPLACEMENT) or len(after) <= len(before)):
            return ""  # an incomplete character (or nothing visible yet): wait for the next ids
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def _release(self, final: bool) -> str:
        held = self._held
        cut = min((i for i in (held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            self._held = ""
            return held[:cut]
        keep = 0 if final else _stop_prefix_len(held, self.stop)
        self._held = held[len(held) - keep:] if keep else ""
        return held[: len(held) - keep]


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string (text that must wait)."""
    longest = max((len(s) for s in stop), default=0)
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop):
            return k
    return 0

