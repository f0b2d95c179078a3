"""TensorRT-LLM-style requests (text_input, max_tokens, stream, random_seed, stop_words, end_id) mapped onto the
token interface, and the text each round's responses carry."""

from __future__ import annotations

import numpy as np
import pytest

from dspark_compile.errors import UsageError
from dspark_compile.serving.llm_io import TextOptions, TextReply, text_tensor, token_inputs
from dspark_compile.serving.text import TextCodec

pytest.importorskip("tokenizers", reason="text in/out uses Hugging Face tokenizers")


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x\n", "naïve café ünïcode", "stop here STOP"] * 30, trainer)
    return TextCodec(tok)


def _bytes(*texts: str) -> np.ndarray:
    return np.array([t.encode() for t in texts], dtype=np.object_)


def test_text_request_maps_onto_token_inputs(codec: TextCodec) -> None:
    inputs = {"text_input": _bytes("def f(x):"), "max_tokens": np.array([[7]], dtype=np.int32),
              "stream": np.array([True]), "random_seed": np.array([2**64 - 1], dtype=np.uint64),
              "temperature": np.array([0.5], dtype=np.float32), "stop_words": _bytes("STOP", ""),
              "end_id": np.array([3], dtype=np.int32), "top_k": np.array([0], dtype=np.int32)}
    out, options = token_inputs(inputs, codec)
    assert out["prompt_ids"].dtype == np.int64 and out["prompt_ids"].tolist() == codec.encode("def f(x):")
    assert out["max_new_tokens"].tolist() == [7] and out["max_new_tokens"].dtype == np.int32
    assert out["seed"].tolist() == [2**63 - 1] and out["seed"].dtype == np.int64
    assert out["temperature"].tolist() == [0.5]  # the token interface's own names pass through
    assert set(out) == {"prompt_ids", "max_new_tokens", "seed", "temperature"}
    assert options == TextOptions(stream=True, stop=("STOP",), end_ids=(3,))


def test_token_request_is_unchanged(codec: TextCodec) -> None:
    ids = np.array([1, 2, 3], dtype=np.int64)
    out, options = token_inputs({"prompt_ids": ids, "max_tokens": np.array([4], dtype=np.int32)}, None)
    assert options is None and out["prompt_ids"] is ids and out["max_new_tokens"].tolist() == [4]


@pytest.mark.parametrize(("inputs", "match"), [
    ({"text_input": _bytes("x")}, "no tokenizer"),
    ({"text_input": _bytes("x"), "prompt_ids": np.array([1])}, "either `text_input` or `prompt_ids`"),
    ({"prompt_ids": np.array([1]), "max_tokens": np.array([2], dtype=np.int32),
      "max_new_tokens": np.array([2], dtype=np.int32)}, "either `max_tokens` or `max_new_tokens`"),
    ({"text_input": _bytes("x"), "beam_width": np.array([2], dtype=np.int32)}, "`beam_width` = 2 is not supported"),
    ({"text_input": _bytes("x"), "top_p": np.array([0.9], dtype=np.float32)}, "`top_p`"),
    ({"text_input": _bytes("a", "b")}, "one element"),
    ({"text_input": np.array([b"\xff\xfe"], dtype=np.object_)}, "not valid UTF-8"),
    ({"prompt_ids": np.array([1]), "stop_words": _bytes("x")}, "needs `text_input`"),
])
def test_bad_text_requests_are_usage_errors(codec: TextCodec, inputs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        token_inputs(inputs, None if match == "no tokenizer" else codec)


def test_streamed_reply_sends_text_per_round_and_cuts_at_stop(codec: TextCodec) -> None:
    ids = codec.encode("naïve café stop here STOP after")
    reply = TextReply.create(TextOptions(stream=True, stop=("STOP",)), codec, ())
    sent = []
    for k in range(0, len(ids), 2):
        got = reply.round(ids[k:k + 2])
        if got is not None:
            sent.append(got)
        if reply.stopped:
            break
    last = reply.final()
    if last is not None:
        sent.append(last)
    assert "".join(t for t, _ in sent) == "naïve café stop here "
    assert all(t for t, _ in sent[:-1])  # no empty text response mid-stream (the last may carry only ids)
    sent_ids = [i for _, group in sent for i in group]
    assert sent_ids == ids[: len(sent_ids)]  # every id consumed so far, in order, once


def test_unstreamed_reply_sends_everything_once(codec: TextCodec) -> None:
    ids = codec.encode("def f(x):\n    return x\n")
    eos = codec.token_id("<|endoftext|>")
    reply = TextReply.create(TextOptions(stream=False), codec, (eos,))
    assert all(reply.round([t]) is None for t in [*ids, eos])
    assert reply.stopped
    assert reply.final() == ("def f(x):\n    return x\n", [*ids, eos])
    assert text_tensor("é").tolist() == ["é".encode()]
