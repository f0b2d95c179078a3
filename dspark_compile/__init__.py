"""dspark-compile: compile a target LLM + DSpark draft head into deployable speculative-decoding engines."""

from __future__ import annotations

__version__ = "0.1.0"
