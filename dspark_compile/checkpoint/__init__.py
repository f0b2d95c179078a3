"""Lazy, memory-mapped reading and validation of a Qwen3 target and a DSpark draft checkpoint.

``load_target``/``load_draft`` check the files (raising :class:`~dspark_compile.errors.CheckpointError`);
``validate_pair``/``check_pair`` check that the two fit together
(:class:`~dspark_compile.errors.ValidationError`).
"""

from __future__ import annotations

from dspark_compile.checkpoint.header import TensorInfo, read_header
from dspark_compile.checkpoint.load import (
    DraftCheckpoint,
    TargetCheckpoint,
    check_finite,
    load_draft,
    load_target,
)
from dspark_compile.checkpoint.names import (
    TensorSpec,
    draft_tensor_specs,
    draft_weight_name,
    target_tensor_specs,
    target_weight_name,
)
from dspark_compile.checkpoint.store import WeightStore
from dspark_compile.checkpoint.validate import check_pair, shared_weights_differ, validate_pair

__all__ = [
    "DraftCheckpoint",
    "TargetCheckpoint",
    "TensorInfo",
    "TensorSpec",
    "WeightStore",
    "check_finite",
    "check_pair",
    "draft_tensor_specs",
    "draft_weight_name",
    "load_draft",
    "load_target",
    "read_header",
    "shared_weights_differ",
    "target_tensor_specs",
    "target_weight_name",
    "validate_pair",
]
