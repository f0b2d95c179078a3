"""TextStream against a real byte-level BPE tokenizer trained here: multi-byte characters split across rounds,
stop strings spanning rounds, EOS."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspark_compile.errors import UsageError
from dspark_compile.serving.text import REPLACEMENT, TextCodec, TextStream

tokenizers = pytest.importorskip("tokenizers", reason="text in/out uses Hugging Face tokenizers")

EOS = "<|endoftext|>"
CORPUS = ["def add(a, b):\n    return a + b\n", "héllo wörld, naïve café", "日本語のテキスト", "emoji 😀 and 🚀 end",
          "STOP here. Stopping is not STOP."] * 20
TEXT = "héllo 日本 😀🚀 wörld café STOP tail"


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> TextCodec:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return TextCodec.load(path.parent)


def _rounds(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        out.append(ids[i:i + n])
        i, k = i + n, k + 1
    return out


def test_split_characters_come_out_whole(codec: TextCodec) -> None:
    ids = codec.encode(TEXT)
    assert codec.decode(ids) == TEXT
    # The test means something only if some character's bytes really are split between ids.
    assert any(REPLACEMENT in codec.decode([t]) for t in ids)
    for sizes in ([1], [2, 1, 3], [7]):
        stream = TextStream(codec)
        pieces = [stream.push(r) for r in _rounds(ids, sizes)]
        pieces.append(stream.close())
        assert all(REPLACEMENT not in p for p in pieces), (sizes, pieces)
        assert "".join(pieces) == TEXT
        assert stream.finish_reason == "length" and stream.tokens == len(ids)


def test_incomplete_character_is_held_then_flushed(codec: TextCodec) -> None:
    ids = codec.encode("😀")
    assert len(ids) > 1, "the emoji must span ids for this test"
    stream = TextStream(codec)
    assert stream.push(ids[:-1]) == ""
    assert stream.push(ids[-1:]) == "😀"
    cut = TextStream(codec)
    assert cut.push(ids[:-1]) == ""
    assert cut.close() == REPLACEMENT * len(codec.decode(ids[:-1]))  # what the bytes so far decode to


@pytest.mark.parametrize("sizes", [[1], [3], [2, 5]])
def test_stop_string_cuts_across_rounds(codec: TextCodec, sizes: list[int]) -> None:
    ids = codec.encode(TEXT)
    stream = TextStream(codec, stop=("STOP",))
    pieces = []
    for r in _rounds(ids, sizes):
        pieces.append(stream.push(r))
        assert "".join(pieces) == TEXT[: len("".join(pieces))]  # a prefix of the text, never past the stop
        assert "S" not in "".join(pieces)[TEXT.index("café"):]  # the stop's first letters are held back
    pieces.append(stream.close())
    assert "".join(pieces) == TEXT[: TEXT.index("STOP")]
    assert stream.finish_reason == "stop"
    assert stream.tokens < len(ids)


def test_false_stop_prefix_is_released(codec: TextCodec) -> None:
    stream = TextStream(codec, stop=("STOPPED",))
    ids = codec.encode("a STOP b")
    out = "".join(stream.push([t]) for t in ids)
    assert out == "a STOP b"[: len(out)]
    assert out + stream.close() == "a STOP b"
    assert stream.finish_reason == "length"


def test_eos_ends_the_stream(codec: TextCodec) -> None:
    eos = codec.token_id(EOS)
    assert eos is not None
    ids = codec.encode("café")
    stream = TextStream(codec, eos_token_ids=(eos,))
    out = stream.push([*ids, eos, *codec.encode("after")])
    assert out + stream.close() == "café"
    assert stream.finish_reason == "eos" and stream.tokens == len(ids) + 1
    assert stream.push(codec.encode("more")) == ""


def test_missing_tokenizer_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"tokenizer\.json"):
        TextCodec.load(tmp_path)
    assert TextCodec.find(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a Hugging Face tokenizer"):
        TextCodec.load(tmp_path)
