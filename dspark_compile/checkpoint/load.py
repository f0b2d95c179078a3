"""Open a Hugging Face target directory and a DeepSpec DSpark draft directory.

Loading raises :class:`~dspark_compile.errors.CheckpointError` on the first defect of the files; whether the
two fit together is :func:`~dspark_compile.checkpoint.validate.validate_pair`'s job (it lists every problem).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dspark_compile.checkpoint.fp8 import HF_QUANT_CONFIG, Fp8Checkpoint, read_layout, scan
from dspark_compile.checkpoint.store import WeightStore
from dspark_compile.errors import CheckpointError
from dspark_compile.model_config import DraftConfig, TargetConfig, parse_draft_config, parse_target_config

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TargetCheckpoint:
    """A Qwen3 target: its directory, parsed config, lazy weights and every file read (config first)."""

    path: Path
    config: TargetConfig
    weights: WeightStore
    files: tuple[Path, ...]
    quant: Fp8Checkpoint | None = None  # pre-quantized FP8 weights (checkpoint/fp8.py)


@dataclass(frozen=True)
class DraftCheckpoint:
    """A DSpark draft: its directory, parsed config, lazy weights and every file read (config first)."""

    path: Path
    config: DraftConfig
    weights: WeightStore
    files: tuple[Path, ...]


def load_target(path: str | Path, *, allow_nonfinite: bool = False) -> TargetCheckpoint:
    """Open a Hugging Face target directory (``config.json`` + safetensors, bf16/fp32 or pre-quantized FP8); the
    ``eos_token_id`` of ``generation_config.json`` is used when ``config.json`` has none."""
    directory = _checkpoint_dir(path, "target")
    config_path = directory / "config.json"
    raw = _read_json(config_path)
    config = parse_target_config(raw, config_path)
    layout = read_layout(directory, raw)
    files = [config_path]
    if (directory / HF_QUANT_CONFIG).is_file():
        files.append(directory / HF_QUANT_CONFIG)
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():
        files.append(generation_path)
        if not config.eos_token_ids:
            eos = _eos_ids(_read_json(generation_path), generation_path)
            config = dataclasses.replace(config, eos_token_ids=eos)
    weights, weight_files = _open_weights(directory)
    quant = scan(layout, weights) if layout is not None else None
    if quant is None and any(weights.dtype(n) == "F8_E4M3" for n in weights.names()):
        raise CheckpointError(f"{config_path}: the weights hold F8_E4M3 tensors but no `quantization_config` (or "
                              "hf_quant_config.json) says how to scale them; use the checkpoint's original config.")
    if not allow_nonfinite:
        check_finite(weights)
    return TargetCheckpoint(path=directory, config=config, weights=weights, files=(*files, *weight_files),
                            quant=quant)


def load_draft(path: str | Path, *, allow_nonfinite: bool = False) -> DraftCheckpoint:
    """Open a DeepSpec ``Qwen3DSparkModel`` directory (``config.json`` + safetensors weights)."""
    directory = _checkpoint_dir(path, "draft")
    config_path = directory / "config.json"
    raw = _read_json(config_path)
    draft_vocab = raw.get("draft_vocab_size")
    if draft_vocab is not None and draft_vocab != raw.get("vocab_size"):
        raise CheckpointError(f"{config_path}: `draft_vocab_size` is {draft_vocab} but `vocab_size` is "
                              f"{raw.get('vocab_size')}; drafts with a pruned vocabulary are not supported. Use a "
                              f"draft trained on the full target vocabulary.")
    config = parse_draft_config(raw, config_path)
    weights, weight_files = _open_weights(directory)
    if not allow_nonfinite:
        check_finite(weights)
    return DraftCheckpoint(path=directory, config=config, weights=weights, files=(config_path, *weight_files))


def check_finite(weights: WeightStore) -> None:
    """Raise if any floating tensor holds NaN or Inf; reads tensor by tensor in bounded chunks."""
    try:
        for name in (n for n in weights.names() if weights.dtype(n) in FLOAT_DTYPES):
            weights.release()  # keep at most one tensor's pages mapped
            nan = inf = 0
            for chunk in weights.iter_row_chunks(name):
                if not bool(torch.isfinite(chunk).all()):
                    nan += int(torch.isnan(chunk).sum())
                    inf += int(torch.isinf(chunk).sum())
            if nan or inf:
                raise CheckpointError(f"{weights.file_of(name)}: tensor `{name}` holds {nan} NaN and {inf} Inf "
                                      "value(s); expected finite weights. Re-export the checkpoint, or load it with "
                                      "allow_nonfinite=True to proceed anyway.")
    finally:
        weights.release()


def _checkpoint_dir(path: str | Path, role: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(f"{directory}: {role} checkpoint directory does not exist; expected a directory with "
                              f"config.json and safetensors weights. Check the path.")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: expected a {role} checkpoint directory, found a file. Pass the directory "
                              f"that holds config.json and the .safetensors weights.")
    if not any(directory.iterdir()):
        raise CheckpointError(f"{directory}: {role} checkpoint directory is empty; expected config.json and "
                              f"safetensors weights. Download or export the checkpoint into it.")
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing; expected the Hugging Face config of the checkpoint. Copy it "
                              f"from the original checkpoint directory.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); fix or re-download the file.") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc}).") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}; fix the file.")
    return data


def _eos_ids(raw: dict[str, Any], path: Path) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    ids = [eos] if isinstance(eos, int) else eos
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise CheckpointError(f"{path}: `eos_token_id` must be an integer or a list of integers, found {eos!r}; fix "
                              f"the file.")
    return tuple(ids)


def _open_weights(directory: Path) -> tuple[WeightStore, tuple[Path, ...]]:
    """Find the safetensors weights (single file or sharded index) and index their tensors."""
    single = directory / SAFETENSORS_FILE
    index = directory / SAFETENSORS_INDEX
    if single.is_file():
        return WeightStore.from_files(directory, [single]), (single,)
    if index.is_file():
        shards = _read_index(index)
        store = WeightStore.from_files(directory, sorted(set(shards.values())))
        _check_index(index, shards, store)
        return store, (index, *store.files())
    present = sorted(p.name for p in directory.iterdir() if p.is_file())
    pickles = [n for n in present if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(f"{directory}: only pickle weights found ({', '.join(pickles)}); expected "
                              f"{SAFETENSORS_FILE} or {SAFETENSORS_INDEX}. Pickle files can run arbitrary code and are "
                              f"never loaded; convert them to safetensors (e.g. `model.save_pretrained(out, "
                              f"safe_serialization=True)`).")
    other = [n for n in present if n.endswith(".safetensors")]
    found = f"found other safetensors files ({', '.join(other)})" if other else f"found {', '.join(present)}"
    raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; {found}. Export the weights "
                          f"with `save_pretrained` (safetensors) or name the single weights file model.safetensors.")


def _read_index(index: Path) -> dict[str, Path]:
    raw = _read_json(index)
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: `weight_map` must be a non-empty object of tensor name -> shard file name; "
                              f"re-export the checkpoint.")
    directory = index.parent
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        shard_path = directory / shard
        if Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard {shard!r} of tensor `{name}` is not a plain file name in the "
                                  f"checkpoint directory; fix the index.")
        if not shard_path.is_file():
            raise CheckpointError(f"{index}: shard {shard!r} (holding `{name}`) does not exist in {directory}; "
                                  f"download the missing shard or re-export the checkpoint.")
        shards[name] = shard_path
    return shards


def _check_index(index: Path, shards: dict[str, Path], store: WeightStore) -> None:
    for name, shard in shards.items():
        if name not in store or store.file_of(name) != shard:
            raise CheckpointError(f"{index}: tensor `{name}` is mapped to {shard.name} but that shard does not hold "
                                  f"it; fix the index or re-export the checkpoint.")
    unlisted = [name for name in store.names() if name not in shards]
    if unlisted:
        raise CheckpointError(f"{store.file_of(unlisted[0])}: tensor `{unlisted[0]}` is not listed in {index.name} "
                              f"({len(unlisted)} unlisted); expected every shard tensor in the index. Fix the index or "
                              "re-export the checkpoint.")
