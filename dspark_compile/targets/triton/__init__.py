"""Triton Inference Server target: a model repository for the two graphs plus a streaming orchestrator."""

from __future__ import annotations
