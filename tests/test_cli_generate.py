"""`dspark-compile generate` and `inspect` on good inputs: prompt sources, output formats, verdicts.

Runs the click command in-process (``CliRunner``); the error paths through the real entry point are in
test_cli_errors.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open

from dspark_compile.cli import cli

MAX_NEW = 24



def prompt_args(prompts: list[list[int]]) -> list[str]:
    return [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]


def run(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}:\n{result.output}"
    return result


def generate_json(pair: tuple[Path, Path] | None, target: Path, *args: str) -> list[dict[str, Any]]:
    draft = ["--draft", str(pair[1])] if pair is not None else []
    out = run("generate", "--target", str(target), *draft, "--max-new-tokens", str(MAX_NEW), "--json", *args)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_json_lines_have_exactly_the_documented_structure(golden_pair: tuple[Path, Path],
                                                          golden_trace: dict[str, Any]) -> None:
    prompts = [r["prompt"] for r in golden_trace["greedy"]]
    lines = generate_json(golden_pair, golden_pair[0], *prompt_args(prompts))
    assert len(lines) == len(prompts)
    for obj, ref in zip(lines, golden_trace["greedy"], strict=True):
        assert set(obj) == {"tokens", "rounds", "mean_accepted"}
        assert all(set(r) == {"draft", "accepted"} for r in obj["rounds"])
        assert all(isinstance(t, int) for t in obj["tokens"]) and len(obj["tokens"]) == MAX_NEW
        assert obj["tokens"] == ref["tokens"][:MAX_NEW]
        assert all(len(r["draft"]) == 7 and 1 <= r["accepted"] <= 8 for r in obj["rounds"])
        assert obj["mean_accepted"] == pytest.approx(sum(r["accepted"] for r in obj["rounds"]) / len(obj["rounds"]))
        # the rounds are a prefix of the golden trace (the golden one ran to 48 tokens)
        n = len(obj["rounds"])
        assert [r["accepted"] for r in obj["rounds"]] == ref["acceptance_lengths"][:n]


def test_prompt_file_lists_and_objects(tmp_path: Path, golden_pair: tuple[Path, Path],
                                       golden_trace: dict[str, Any]) -> None:
    prompts = [r["prompt"] for r in golden_trace["greedy"]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([json.dumps(prompts[0]), "", json.dumps({"prompt_ids": prompts[1]}),
                               json.dumps({"prompt": prompts[2], "note": "extra keys are ignored"}),
                               json.dumps(prompts[3]), ""]) + "\n")
    from_file = generate_json(golden_pair, golden_pair[0], "--prompt-file", str(path))
    assert [o["tokens"] for o in from_file] == [r["tokens"][:MAX_NEW] for r in golden_trace["greedy"]]
    from_flags = generate_json(golden_pair, golden_pair[0], *prompt_args(prompts))
    assert from_file == from_flags


def test_prompt_file_text_is_encoded_with_the_targets_tokenizer(tmp_path: Path, golden_pair: tuple[Path, Path],
                                                                golden_trace: dict[str, Any]) -> None:
    """Text lines (a JSON string, `text`, a string `prompt`) decode as their ids do; without a tokenizer at hand
    a text line is one error naming the file and line."""
    import shutil

    from dspark_compile.errors import UsageError
    from dspark_compile.runtime.decode import build_tokenizer, read_prompt_file
    from dspark_compile.serving.replay import write_word_tokenizer

    prompts = [r["prompt"] for r in golden_trace["greedy"]][:3]
    target = tmp_path / "target"
    shutil.copytree(golden_pair[0], target)
    write_word_tokenizer(json.loads((target / "config.json").read_text())["vocab_size"], target)  # id i: word w{i}
    words = [" ".join(f"w{t}" for t in p) for p in prompts]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([json.dumps(words[0]), json.dumps({"text": words[1]}),
                               json.dumps({"prompt": words[2]})]) + "\n")
    from_text = generate_json((target, golden_pair[1]), target, "--prompt-file", str(path))
    assert [o["tokens"] for o in from_text] == [r["tokens"][:MAX_NEW] for r in golden_trace["greedy"][:3]]
    with pytest.raises(UsageError, match=f"^{path}:1: a text prompt needs the target checkpoint's tokenizer.json"):
        read_prompt_file(path)
    # a build's prompts: the tokenizer its Triton repository holds, else its spec's target checkpoint
    build = tmp_path / "build"
    build.mkdir()
    assert build_tokenizer(build) is None
    (build / "build_spec.json").write_text(json.dumps({"target": str(target)}))
    assert build_tokenizer(build) == target
    (build / "triton" / "dspark").mkdir(parents=True)
    shutil.copyfile(target / "tokenizer.json", build / "triton" / "dspark" / "tokenizer.json")
    assert build_tokenizer(build) == build / "triton" / "dspark" / "tokenizer.json"
    assert read_prompt_file(path, build_tokenizer(build)) == prompts


def test_baseline_is_target_only(golden_pair: tuple[Path, Path], golden_trace: dict[str, Any]) -> None:
    """--baseline needs no draft; every round commits one token without drafting anything."""
    prompts = [r["prompt"] for r in golden_trace["baseline"]]
    lines = generate_json(None, golden_pair[0], "--baseline", *prompt_args(prompts))
    assert [o["tokens"] for o in lines] == [r["tokens"][:MAX_NEW] for r in golden_trace["baseline"]]
    for obj in lines:
        assert set(obj) == {"tokens", "rounds", "mean_accepted"}
        assert obj["rounds"] == []  # target-only decoding has no draft rounds
        assert obj["mean_accepted"] == 1.0  # one committed token per target step


def test_other_checkpoint_shapes_through_the_cli(make_pair: Any) -> None:
    """Tied embeddings, block 3, an RNN Markov head of rank 4 and taps containing -1: speculative == baseline."""
    pair = make_pair(tie_word_embeddings=True, block_size=3, markov_rank=4, markov_head_type="rnn",
                     target_layer_ids=(-1, 1), seed=5)
    prompts = prompt_args([[5, 17, 300, 2], list(range(40, 70))])
    spec = generate_json(pair, pair[0], *prompts)
    base = generate_json(None, pair[0], "--baseline", *prompts)
    assert [o["tokens"] for o in spec] == [o["tokens"] for o in base]
    assert all(len(o["tokens"]) == MAX_NEW for o in spec)
    assert all(len(r["draft"]) == 3 for o in spec for r in o["rounds"])
    (smaller,) = generate_json(pair, pair[0], *prompts[:2], "--block-size", "2")
    assert smaller["tokens"] == base[0]["tokens"]


def test_block_size_and_verify_flags(golden_pair: tuple[Path, Path], golden_trace: dict[str, Any]) -> None:
    prompt = ",".join(map(str, golden_trace["greedy"][3]["prompt"]))
    want = golden_trace["greedy"][3]["tokens"][:MAX_NEW]
    (small,) = generate_json(golden_pair, golden_pair[0], "--prompt-ids", prompt, "--block-size", "3")
    assert small["tokens"] == want
    assert all(len(r["draft"]) == 3 and r["accepted"] <= 4 for r in small["rounds"])
    assert max(r["accepted"] for r in small["rounds"]) == 4
    (thr,) = generate_json(golden_pair, golden_pair[0], "--prompt-ids", prompt, "--verify", "threshold=0.5")
    (conf,) = generate_json(golden_pair, golden_pair[0], "--prompt-ids", prompt, "--confidence-threshold", "0.5")
    assert thr == conf
    golden_thr = golden_trace["threshold_0.5"][3]
    assert thr["tokens"] == want
    assert [r["accepted"] for r in thr["rounds"]] == golden_thr["acceptance_lengths"][: len(thr["rounds"])]
    assert [r["draft"] for r in thr["rounds"]] == [r["draft"] for r in golden_thr["rounds"]][: len(thr["rounds"])]
    # --draft-rows 0: every round a plain step (nothing verified), the same tokens
    (plain,) = generate_json(golden_pair, golden_pair[0], "--prompt-ids", prompt, "--draft-rows", "0")
    assert plain["tokens"] == want and all(r["draft"] == [] and r["accepted"] == 1 for r in plain["rounds"])


def test_sampling_seed_flag(golden_pair: tuple[Path, Path]) -> None:
    args = ("--prompt-ids", "5,6,7,8", "--prompt-ids", "5,6,7,8", "--temperature", "1.0")
    a = generate_json(golden_pair, golden_pair[0], *args, "--seed", "3")
    b = generate_json(golden_pair, golden_pair[0], *args, "--seed", "3")
    c = generate_json(golden_pair, golden_pair[0], *args, "--seed", "4")
    assert a == b
    assert a[0]["tokens"] != a[1]["tokens"]  # identical prompts, independent streams
    assert [o["tokens"] for o in a] != [o["tokens"] for o in c]
    assert all(len(o["tokens"]) == MAX_NEW for o in a + c)


def test_human_output(golden_pair: tuple[Path, Path], golden_trace: dict[str, Any]) -> None:
    ref = golden_trace["greedy"][3]
    out = run("generate", "--target", str(golden_pair[0]), "--draft", str(golden_pair[1]), "--prompt-ids",
              ",".join(map(str, ref["prompt"])), "--max-new-tokens", "48").stdout.splitlines()
    assert out[0] == "tokens: " + " ".join(map(str, ref["tokens"]))
    assert out[1] == f"rounds: {len(ref['rounds'])}  mean accepted (bonus counted): {ref['mean_accepted']:.3f}"


def _numel(directory: Path, skip: tuple[str, ...] = ()) -> int:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys() if n not in skip)  # noqa: SIM118


def test_inspect_json_on_golden(golden_pair: tuple[Path, Path]) -> None:
    target, draft = golden_pair
    report = json.loads(run("inspect", str(target), str(draft), "--json").stdout)
    assert report["compatible"] is True and report["problems"] == []
    t, d = report["target"], report["draft"]
    assert (t["architecture"], t["layers"], t["hidden_size"], t["vocab_size"], t["heads"], t["kv_heads"],
            t["head_dim"], t["tied_embeddings"]) == ("Qwen3ForCausalLM", 4, 64, 384, 4, 2, 16, False)
    assert (d["architecture"], d["layers"], d["block_size"], d["target_layer_ids"], d["mask_token_id"],
            d["markov_rank"], d["markov_head_type"], d["confidence_head"], d["confidence_head_with_markov"]) == (
        "Qwen3DSparkModel", 2, 7, [0, 1, 2], 383, 16, "vanilla", True, True)
    assert t["parameters"] == _numel(target) == 197312
    own = _numel(draft, skip=("embed_tokens.weight", "lm_head.weight"))
    assert d["parameters_excluding_shared"] == own
    assert report["memory_bytes"] == {"fp32": 4 * (197312 + own), "fp16": 2 * (197312 + own),
                                      "bf16": 2 * (197312 + own)}
    human = run("inspect", str(target), str(draft)).stdout
    assert "compatible" in human and "NOT compatible" not in human


@pytest.mark.parametrize("layout", ["hf_block", "modelopt"])
def test_inspect_fp8_checkpoint_counts_e4m3_bytes(golden_pair: tuple[Path, Path], tmp_path: Path, layout: str) -> None:
    """A pre-quantized FP8 target: its method named, the same parameters as the bf16 checkpoint it came from (the
    scale tensors are not parameters), and memory with the e4m3 weights at one byte and the scales in float32 (it
    counted every weight at the dtype's width)."""
    from tests.checkpoint.fp8_checkpoints import write_fp8_target

    target, draft = golden_pair
    write_fp8_target(target, tmp_path / "fp8", layout, block=(32, 32))
    report = json.loads(run("inspect", str(tmp_path / "fp8"), str(draft), "--json").stdout)
    t = report["target"]
    assert t["quantization"]["method"] == {"hf_block": "fp8_block", "modelopt": "fp8_tensor"}[layout]
    assert t["quantization"]["weights"] == 28 and t["parameters"] == 197312 and report["compatible"]
    own = report["draft"]["parameters_excluding_shared"]
    e4m3 = _numel(tmp_path / "fp8", skip=tuple(n for n, dtype in _dtypes(tmp_path / "fp8").items()
                                               if dtype != torch.float8_e4m3fn))
    scales = _numel(tmp_path / "fp8") - 197312  # the tensors the bf16 checkpoint did not have
    assert 0 < scales < e4m3 < 197312
    for dtype, width in (("fp32", 4), ("bf16", 2)):
        assert report["memory_bytes"][dtype] == width * (197312 + own - e4m3) + e4m3 + 4 * scales
    assert "28 e4m3 weights" in run("inspect", str(tmp_path / "fp8"), str(draft)).stdout
    plain = json.loads(run("inspect", str(target), str(draft), "--json").stdout)
    assert plain["target"]["quantization"] is None


def _dtypes(directory: Path) -> dict[str, torch.dtype]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n).dtype for n in f.keys()}  # noqa: SIM118


def test_inspect_incompatible_pair_lists_every_problem(make_pair: Any) -> None:
    target, _ = make_pair()
    _, draft = make_pair(vocab_size=300)  # a draft trained for another vocabulary ...
    config = json.loads((draft / "config.json").read_text())
    config["target_layer_ids"] = [0, 3, 9]  # ... whose taps include the target's last layer and a missing one
    (draft / "config.json").write_text(json.dumps(config))
    result = run("inspect", str(target), str(draft), "--json", code=2)
    report = json.loads(result.stdout)
    assert report["compatible"] is False
    problems = report["problems"]
    assert len(problems) == 3, problems
    assert any("`vocab_size` is 300, expected 384" in p for p in problems)
    assert any("contains 3, the target's last layer" in p for p in problems)
    assert any("contains 9" in p and "[0, 3]" in p for p in problems)
    assert all(str(draft / "config.json") in p for p in problems)
    human = run("inspect", str(target), str(draft), code=2).stdout
    assert "NOT compatible" in human
    assert sum(line.strip().startswith("- ") for line in human.splitlines()) == 3
