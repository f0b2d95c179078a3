"""The model families: which target and draft modules a checkpoint's config calls for.

A family is one module per concern, looked up here by the ``family`` its parsed config carries
(``model_config.model_family`` reads ``model_type``/``architectures``): config parsing (``model_config.py``),
tensor names and validation (``checkpoint/names.py``, ``checkpoint/validate.py``), the target and the draft
(``models/``; the graft is the draft's ``from_weights``, which takes the target's embedding and LM head).
Passes and runtimes ask this registry and never branch on the family; a third family adds its modules and one
entry to :data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dspark_compile.model_config import TargetConfig
from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.gemma4 import Gemma4Target
from dspark_compile.models.gemma4_draft import Gemma4Draft
from dspark_compile.models.qwen3 import Qwen3Target


@dataclass(frozen=True)
class ModelFamily:
    name: str
    target: Any  # class: (cfg, tap_layer_ids), from_weights(cfg, get, ...), init_buffers()
    draft: type[DSparkDraft]


FAMILIES: dict[str, ModelFamily] = {
    "qwen3": ModelFamily("qwen3", Qwen3Target, DSparkDraft),
    "gemma4": ModelFamily("gemma4", Gemma4Target, Gemma4Draft),
}


def family_of(cfg: TargetConfig) -> ModelFamily:
    return FAMILIES[cfg.family]
