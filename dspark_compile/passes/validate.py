"""Pass `validate`: refuse an inconsistent (target, draft) pair before anything is built."""

from __future__ import annotations

from dspark_compile.checkpoint import check_pair
from dspark_compile.errors import UsageError
from dspark_compile.program import CheckpointPair
from dspark_compile.spec import BuildSpec


def validate(pair: CheckpointPair, spec: BuildSpec) -> CheckpointPair:
    assert pair.draft is not None
    check_pair(pair.target, pair.draft)
    trained = pair.draft.config.block_size
    if spec.block_size is not None and spec.block_size > trained:
        raise UsageError(f"--block-size {spec.block_size} exceeds the draft's trained block_size {trained} "
                         f"({pair.draft.path / 'config.json'}); use a value in [1, {trained}]")
    return pair
