"""``dspark::SpecVerify``: lossless verification of drafted tokens (specification: README.md here).

Re-exports the dependency-light parts and registers ``torch.ops.dspark.spec_verify``; ``kernel`` (needs
``triton``) and ``trt_plugin`` (needs full TensorRT when called) are imported explicitly by their users.
"""

from __future__ import annotations

from dspark_compile.plugins.spec_verify.op import spec_verify
from dspark_compile.plugins.spec_verify.op_schema import GREEDY, MODES, SAMPLING, SPEC_VERIFY, make_model, make_node
from dspark_compile.plugins.spec_verify.reference import (
    decision_margin,
    inverse_cdf_torch,
    random_inputs,
    spec_verify_reference,
    spec_verify_torch,
)

__all__ = ["GREEDY", "MODES", "SAMPLING", "SPEC_VERIFY", "decision_margin", "inverse_cdf_torch", "make_model",
           "make_node", "random_inputs", "spec_verify", "spec_verify_reference", "spec_verify_torch"]
