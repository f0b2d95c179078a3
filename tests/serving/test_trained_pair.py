"""The trained tiny pair shipped in the package (the demo's): it loads, is small, is package data, its drafts are
accepted on the demo prompts and its text round-trips through the tokenizer."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from dspark_compile import api
from dspark_compile.api import DEMO_PROMPTS
from dspark_compile.checkpoint import load_draft, load_target, validate_pair
from dspark_compile.examples import TRAINED_PAIR, trained_tiny_pair
from dspark_compile.serving.text import TextCodec, TextStream

pytest.importorskip("tokenizers", reason="the shipped pair's tokenizer is a tokenizers byte-level BPE")

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_pair_is_small_valid_package_data() -> None:
    files = [p for p in TRAINED_PAIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    wanted = patterns["dspark_compile"]
    for p in files:  # every file of the pair goes into the wheel
        rel = p.relative_to(TRAINED_PAIR.parent).as_posix()
        assert any(fnmatch.fnmatch(rel, w) for w in wanted), rel
    target, draft = trained_tiny_pair()
    assert validate_pair(load_target(target), load_draft(draft)) == []


def test_shipped_pair_accepts_drafts_and_writes_text(tmp_path: Path) -> None:
    target, draft = trained_tiny_pair(copy_to=tmp_path)
    codec = TextCodec.load(target)
    prompts = [codec.encode(p) for p in DEMO_PROMPTS]
    spec = api.generate(target, draft, prompts, max_new_tokens=32)
    base = api.generate(target, None, prompts, max_new_tokens=32, baseline=True)
    assert [r.tokens for r in spec] == [r.tokens for r in base]  # lossless
    accepted = [x["accepted"] for r in spec for x in r.rounds]
    assert sum(accepted) / len(accepted) > 1.2
    for r in spec:
        stream = TextStream(codec, eos_token_ids=(0,))
        text = stream.push(r.tokens) + stream.close()
        assert text and codec.encode(text)  # printable text, not only ids
