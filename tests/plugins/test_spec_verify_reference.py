"""The NumPy reference on hand-computed cases, and spec_verify_torch's export-friendliness.

(spec_verify_torch == reference on randomized cases: tests/passes/test_decompose_spec_verify.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dspark_compile.plugins.spec_verify.op_schema import GREEDY, SAMPLING
from dspark_compile.plugins.spec_verify.reference import (
    decision_margin,
    inverse_cdf,
    random_inputs,
    spec_verify_reference,
    spec_verify_torch,
)


def test_greedy_by_hand() -> None:
    logits = np.array([[[1, 3, 3], [2, 0, 2], [0, 0, 1]],
                       [[1, 3, 3], [2, 0, 2], [0, 0, 1]]], dtype=np.float32)
    drafts = np.array([[1, 0], [2, 0]])  # request 1 drafts the *second* tied maximum: rejected
    accepted, next_token = spec_verify_reference(logits, drafts, np.array([2, 2]), mode=GREEDY)
    assert accepted.tolist() == [2, 0]
    assert next_token.tolist() == [2, 1]
    accepted, next_token = spec_verify_reference(logits, drafts, np.array([1, 0]), mode=GREEDY)
    assert accepted.tolist() == [1, 0] and next_token.tolist() == [0, 1]


def _sampling_by_hand(u0: float, u_draw: float) -> tuple[int, int]:
    p = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    q = np.array([[[0.1, 0.6, 0.1, 0.2]]], dtype=np.float32)
    accepted, next_token = spec_verify_reference(
        np.log(p)[None].astype(np.float32), np.array([[1]]), np.array([1]), mode=SAMPLING, draft_probs=q,
        temperature=np.array([1.0], np.float32), uniforms=np.array([[u0, u_draw]], np.float32))
    return int(accepted[0]), int(next_token[0])


def test_sampling_by_hand() -> None:
    # ratio = p(1)/q(1) = 0.3/0.6 = 0.5; residual = [0.3, 0, 0.1, 0] (sum 0.4): CDF steps at 0.75 and 1.
    assert _sampling_by_hand(0.6, 0.70) == (0, 0)
    assert _sampling_by_hand(0.6, 0.80) == (0, 2)
    # accepted: the bonus token comes from p_1 = [0.1, 0.2, 0.3, 0.4], CDF 0.1, 0.3, 0.6, 1.0.
    assert _sampling_by_hand(0.4, 0.05) == (1, 0)
    assert _sampling_by_hand(0.4, 0.65) == (1, 3)


def test_zero_temperature_is_greedy_and_clamps() -> None:
    x = random_inputs(12, 4, 30, mode=SAMPLING, generator=torch.Generator().manual_seed(3), greedy_row_prob=1.0)
    x["verify_len"] = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 9, 4, 4, 4, 4])
    greedy = {k: x[k] for k in ("target_logits", "draft_tokens", "verify_len")}
    got = spec_verify_reference(**x, mode=SAMPLING)
    want = spec_verify_reference(**greedy, mode=GREEDY)
    np.testing.assert_array_equal(got, want)
    assert (decision_margin(**x, mode=SAMPLING) == np.inf).all()


def test_inverse_cdf_fallback() -> None:
    assert inverse_cdf(np.array([0.0, 0.5, 0.5, 0.0]), 0.0) == 1
    # The sequential cumsum stays at 1.0 (1 + 2^-24 rounds to 1) while NumPy's pairwise sum exceeds it, so no
    # cumsum entry exceeds u·sum for u just below 1: the last positive weight is drawn.
    w = np.array([1.0] + [2.0**-24] * 15, np.float32)
    u = np.float32(1 - 2**-24)
    assert not (np.cumsum(w) > u * w.sum()).any()
    assert inverse_cdf(w, u) == 15


def test_sampling_arguments_required() -> None:
    x = random_inputs(2, 2, 5, mode=GREEDY, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs draft_probs"):
        spec_verify_reference(**x, mode=SAMPLING)
    with pytest.raises(ValueError, match="mode"):
        spec_verify_torch(**x, mode="beam")


class _Verify(torch.nn.Module):
    def forward(self, target_logits, draft_tokens, verify_len, draft_probs, temperature, uniforms):
        return spec_verify_torch(target_logits, draft_tokens, verify_len, mode=SAMPLING, draft_probs=draft_probs,
                                 temperature=temperature, uniforms=uniforms)


def test_torch_version_exports_with_dynamic_shapes() -> None:
    from torch.export import Dim, export

    x = random_inputs(4, 3, 20, mode=SAMPLING, generator=torch.Generator().manual_seed(0))
    b, g, v = Dim("B"), Dim("G", min=1, max=64), Dim("V")
    shapes = {"target_logits": {0: b, 1: g + 1, 2: v}, "draft_tokens": {0: b, 1: g}, "verify_len": {0: b},
              "draft_probs": {0: b, 1: g, 2: v}, "temperature": {0: b}, "uniforms": {0: b, 1: g + 1}}
    program = export(_Verify(), (), kwargs=x, dynamic_shapes=shapes)
    y = random_inputs(7, 5, 33, mode=SAMPLING, generator=torch.Generator().manual_seed(1), greedy_row_prob=0.3)
    for got, want in zip(program.module()(**y), spec_verify_torch(**y, mode=SAMPLING), strict=True):
        torch.testing.assert_close(got, want)
