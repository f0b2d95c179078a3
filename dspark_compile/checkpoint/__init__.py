"""Lazy, memory-mapped reading and validation of a Qwen3 target and a DSpark draft checkpoint.

``load_target``/``load_draft`` check the files (raising :class:`~dspark_compile.errors.CheckpointError`);
``validate_pair``/``check_pair`` check that the two fit together
(:class:`~dspark_compile.errors.ValidationError`).
"""

from __future__ import annotations

from dspark_compile.checkpoint.load import (
    DraftCheckpoint,
    TargetCheckpoint,
    check_finite,
    load_draft,
    load_target,
)
from dspark_compile.checkpoint.names import (
    WeightSpec,
    draft_weight_name,
    draft_weight_specs,
    target_weight_name,
    target_weight_specs,
)
from dspark_compile.checkpoint.store import TensorInfo, WeightStore, read_header
from dspark_compile.checkpoint.validate import check_pair, shared_weights_differ, validate_pair

__all__ = [
    "DraftCheckpoint",
    "TargetCheckpoint",
    "TensorInfo",
    "WeightSpec",
    "WeightStore",
    "check_finite",
    "check_pair",
    "draft_weight_name",
    "draft_weight_specs",
    "load_draft",
    "load_target",
    "read_header",
    "shared_weights_differ",
    "target_weight_name",
    "target_weight_specs",
    "validate_pair",
]
