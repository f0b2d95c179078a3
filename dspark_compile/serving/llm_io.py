"""The Triton LLM request/response conventions of the ``dspark`` model, beside its token-id interface.

Clients and load generators written for Triton's TensorRT-LLM ensemble send ``text_input`` (BYTES),
``max_tokens`` (INT32), ``stream`` (BOOL), ``temperature`` (FP32), ``random_seed`` (UINT64), ``stop_words``
(BYTES [n]), ``end_id`` (INT32), and read ``text_output`` (BYTES) from every response. :func:`token_inputs`
maps such a request onto the token interface (``prompt_ids``, ``max_new_tokens``, ``seed``) that the
orchestrator validates, and :class:`TextReply` turns the ids each round commits into the text to send: one
response per round that has new text when ``stream`` is true, else one response with all the text at the end
(what TensorRT-LLM does). The orchestrator stays transport-only; this module needs no Triton.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dspark_compile.errors import UsageError
from dspark_compile.serving.text import TextCodec, TextStream

# name, Triton data type, dims: the TensorRT-LLM ensemble inputs we honour (all optional).
LLM_INPUTS = (
    ("text_input", "TYPE_STRING", (-1,)),
    ("max_tokens", "TYPE_INT32", (-1,)),
    ("stream", "TYPE_BOOL", (-1,)),
    ("random_seed", "TYPE_UINT64", (-1,)),
    ("stop_words", "TYPE_STRING", (-1,)),
    ("end_id", "TYPE_INT32", (-1,)),
    ("top_k", "TYPE_INT32", (-1,)),
    ("top_p", "TYPE_FP32", (-1,)),
    ("beam_width", "TYPE_INT32", (-1,)),
)
LLM_OUTPUTS = (("text_output", "TYPE_STRING", (-1,)),)
INPUT_NAMES = tuple(name for name, _, _ in LLM_INPUTS)


@dataclass(frozen=True)
class TextOptions:
    """What a text request asked for beyond its tokens."""

    stream: bool = False
    stop: tuple[str, ...] = ()
    end_ids: tuple[int, ...] = ()


def token_inputs(inputs: Mapping[str, np.ndarray | None], codec: TextCodec | None
                 ) -> tuple[dict[str, np.ndarray | None], TextOptions | None]:
    """Map a request's tensors onto the token interface; ``TextOptions`` is None for a token-id request.

    Raises UsageError naming the input for what this model cannot honour (a text request without a tokenizer,
    beams, top-k/top-p sampling, a name given twice under its two spellings).
    """
    out = {k: v for k, v in inputs.items() if k not in INPUT_NAMES}
    _alias(inputs, out, "max_tokens", "max_new_tokens", np.int32)
    _alias(inputs, out, "random_seed", "seed", np.int64)
    for name, neutral in (("beam_width", (1,)), ("top_k", (0,)), ("top_p", (0.0, 1.0))):
        value = _one(inputs, name)
        if value is not None and value not in neutral:
            raise UsageError(f"input `{name}` = {value} is not supported (only {' or '.join(map(str, neutral))}); "
                             "the DSpark model decodes greedily or samples from the full distribution")
    text = _one(inputs, "text_input")
    if text is None:
        if inputs.get("stop_words") is not None:
            raise UsageError("input `stop_words` needs `text_input`; token-id requests end at max_new_tokens or EOS")
        return out, None
    if codec is None:
        raise UsageError("input `text_input`: this model has no tokenizer (dspark/tokenizer.json); send `prompt_ids` "
                         "or rebuild from a target checkpoint that has tokenizer.json")
    if inputs.get("prompt_ids") is not None:
        raise UsageError("give either `text_input` or `prompt_ids`, not both")
    prompt = _text(text, "text_input")
    out["prompt_ids"] = np.asarray(codec.encode(prompt), dtype=np.int64)
    stop_words = inputs.get("stop_words")
    stop = tuple(_text(w, "stop_words") for w in np.asarray(stop_words).reshape(-1)) if stop_words is not None else ()
    end_id = _one(inputs, "end_id")
    stream = _one(inputs, "stream")
    return out, TextOptions(stream=bool(stream) if stream is not None else False,
                            stop=tuple(s for s in stop if s), end_ids=() if end_id is None else (int(end_id),))


def _one(inputs: Mapping[str, np.ndarray | None], name: str) -> Any:
    """The single element of an optional input (clients send [1] or, with a batch dim, [1, 1])."""
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise UsageError(f"input `{name}` must hold one element, found shape {list(array.shape)}")
    return array.reshape(()).item()


def _alias(inputs: Mapping[str, np.ndarray | None], out: dict[str, np.ndarray | None], llm_name: str, name: str,
           dtype: type) -> None:
    value = _one(inputs, llm_name)
    if value is None:
        return
    if inputs.get(name) is not None:
        raise UsageError(f"give either `{llm_name}` or `{name}`, not both")
    if isinstance(value, float | bool) or not isinstance(value, int):
        raise UsageError(f"input `{llm_name}` must be an integer, found {value!r}")
    if dtype is np.int64:  # random_seed is UINT64; our seeds are 63-bit
        value &= (1 << 63) - 1
    out[name] = np.asarray([value], dtype=dtype)


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"input `{name}` is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise UsageError(f"input `{name}` must be BYTES (UTF-8 text), found {type(value).__name__}")


@dataclass
class TextReply:
    """One text request's responses: what to send after each round, and at the end."""

    options: TextOptions
    text: TextStream
    _unsent: list[int] = field(default_factory=list, init=False, repr=False)  # ids not yet in a response
    _all: list[str] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def create(cls, options: TextOptions, codec: TextCodec, eos_token_ids: tuple[int, ...]) -> TextReply:
        return cls(options, TextStream(codec, options.stop, (*eos_token_ids, *options.end_ids)))

    @property
    def stopped(self) -> bool:
        """A stop string or end id was met: the request can end now."""
        return self.text.finished

    def round(self, tokens: list[int]) -> tuple[str, list[int]] | None:
        """(text, ids) to send for this round's ids, or None (nothing visible yet, or not streaming)."""
        self._unsent += tokens
        piece = self.text.push(tokens)
        self._all.append(piece)
        if not self.options.stream or not piece:
            return None
        ids, self._unsent = self._unsent, []
        return piece, ids

    def final(self) -> tuple[str, list[int]] | None:
        """(text, ids) the last response carries: the held text when streaming, all of it otherwise."""
        piece = self.text.close()
        self._all.append(piece)
        ids, self._unsent = self._unsent, []
        if self.options.stream:
            return (piece, ids) if piece or ids else None
        return "".join(self._all), ids


def text_tensor(text: str) -> np.ndarray:
    """``text_output`` as Triton BYTES: a [1] object array of UTF-8 bytes."""
    return np.array([text.encode("utf-8")], dtype=np.object_)
