"""Triton Inference Server target: a model repository for the three graphs plus a streaming orchestrator."""

from __future__ import annotations
