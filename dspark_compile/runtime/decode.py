"""The speculative decode loop (DSPARK.md §4) for a batch of requests, shared by every backend.

Round accounting follows the authors' evaluator so acceptance lengths are comparable with the golden traces:
rounds run while the number of generated tokens (the prefill token included) is at most ``max_new_tokens``,
and the output is cut to ``max_new_tokens`` (and after the first EOS, which is kept).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dspark_compile.errors import UsageError
from dspark_compile.runtime.backend import (
    DecodeBackend,
    Proposal,
    backend_device,
    cache_slots_needed,
    describe_backend,
)

log = logging.getLogger(__name__)


def read_prompt_file(path: Path, tokenizer: Path | None = None) -> list[list[int]]:
    """JSON Lines: each line a list of ids, an object with `prompt_ids` (or `prompt`), or text: a JSON string or an
    object with `text` (or a string `prompt`), encoded as the server encodes `text_input` (no special tokens added)
    with the target checkpoint's tokenizer.json in ``tokenizer`` (its directory, or the file), read only if a line
    holds text. Users' held-out sets are text; their ids would depend on a tokenizer run outside the tool."""
    if not path.is_file():
        raise UsageError(f"{path}: prompt file not found; pass a JSON Lines file with one id list or text per line")
    codec = None
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); expected e.g. [1, 2, 3] or \"some text\"") \
                from None
        ids = row.get("prompt_ids", row.get("prompt", row.get("text"))) if isinstance(row, dict) else row
        if isinstance(ids, str):
            if codec is None:
                codec = _prompt_codec(path, n, tokenizer)
            ids = codec.encode(ids)
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise UsageError(f"{path}:{n}: expected a list of integer token ids, {{\"prompt_ids\": [...]}}, or text "
                             f"(a JSON string or {{\"text\": \"...\"}})")
        prompts.append(ids)
    if not prompts:
        raise UsageError(f"{path}: no prompts in the file")
    return prompts


def _prompt_codec(path: Path, line: int, tokenizer: Path | None) -> Any:
    """The tokenizer a text prompt on ``line`` of ``path`` is encoded with; one error line when there is none."""
    from dspark_compile.serving.text import TOKENIZER_FILE, TextCodec

    if tokenizer is None:
        raise UsageError(f"{path}:{line}: a text prompt needs the target checkpoint's {TOKENIZER_FILE}, and this "
                         "command has no target checkpoint; give token ids instead")
    try:
        return TextCodec.load(tokenizer)
    except UsageError as exc:
        raise UsageError(f"{path}:{line}: a text prompt, but {exc}") from None


def build_tokenizer(build_dir: Path) -> Path | None:
    """Where a build's text prompts are encoded from: the tokenizer.json its Triton repository holds (copied from the
    target checkpoint), else the target checkpoint its ``build_spec.json`` names (None when it names none)."""
    from dspark_compile.targets.triton.repository import ORCHESTRATOR

    copied = Path(build_dir) / "triton" / ORCHESTRATOR / "tokenizer.json"
    if copied.is_file():
        return copied
    try:
        target = json.loads((Path(build_dir) / "build_spec.json").read_text()).get("target")
    except (OSError, ValueError):
        return None
    return Path(target) if target else None


DRAFT_ROWS_FILE = "draft_rows.json"
"""Written into a build by `dspark-compile bench BUILD --plain-rounds --prompt-file P` (:func:`write_draft_rows`),
read by ``--draft-rows auto``: the batch above which speculation lost to plain rounds on the GPU, engine and prompts
it was measured with."""


def write_draft_rows(directory: Path, report: Mapping[str, Any]) -> Path:
    """``directory/draft_rows.json`` from a bench report with plain rounds: the suggestion for the prompts' own
    acceptance, with what it was measured on (atomically: a cut run leaves the previous file)."""
    from dspark_compile.artifacts import write_atomically

    rows = [{"batch": r["batch"], "speculative_tokens_per_s": r["decode"]["speculative"]["tokens_per_s"],
             "plain_tokens_per_s": r["plain_tokens_per_s"]} for r in report["batches"]]
    data = {"draft_rows": report["draft_rows"]["speculative"], "device": report.get("device"),
            "backend": report.get("backend"), "measured": rows}
    path = Path(directory) / DRAFT_ROWS_FILE
    write_atomically(path, json.dumps(data, indent=1).encode() + b"\n")
    return path


def parse_draft_rows(value: int | str | None) -> int | str | None:
    """``--draft-rows`` as a flag, an API argument or a Triton parameter's string: a number of rows >= 0,
    ``"auto"`` (read from the build by :func:`measured_draft_rows`), or None; anything else is one error."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise UsageError(f"draft_rows {value!r}: expected a whole number of rows >= 0, e.g. 16, or auto")
        return int(value)
    VerifyPolicy(draft_rows=value)  # the policy's own check: one error naming --draft-rows
    return value


@dataclass(frozen=True)
class DraftRowsOrigin:
    """Where ``draft_rows.json``'s number was measured: the file, and the backend and GPU (None where the file does
    not say), which :meth:`VerifyPolicy.warn_if_measured_elsewhere` compares with the serving backend's."""

    path: Path
    backend: str | None = None
    device: str | None = None


def measured_draft_rows(directory: Path) -> tuple[int | None, DraftRowsOrigin]:
    """``--draft-rows auto``: the number in ``directory/draft_rows.json`` (None: speculation won at every batch
    measured, so no limit) and where it was measured. A missing or unreadable file is one error line naming it and
    the command that writes it: which rows to stop drafting at depends on the GPU, the engine and the traffic, so
    it is measured."""
    path = Path(directory) / DRAFT_ROWS_FILE
    fix = ("run `dspark-compile bench BUILD --plain-rounds --prompt-file PROMPTS.jsonl --batch 1,16,32,64` on the "
           "serving GPU first, or pass a number of rows")
    if not path.is_file():
        raise UsageError(f"--draft-rows auto: {path} is missing; {fix}")
    try:
        data = json.loads(path.read_text())
        value = data["draft_rows"]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--draft-rows auto: {path} is not a draft_rows file ({e}); {fix}") from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise UsageError(f"--draft-rows auto: {path} holds draft_rows {value!r}, not a number of rows >= 0; {fix}")
    backend = data.get("backend")
    backend = backend.get("backend") if isinstance(backend, dict) else None
    device = data.get("device")
    return value, DraftRowsOrigin(path, backend if isinstance(backend, str) else None,
                                  device if isinstance(device, str) else None)


@dataclass(frozen=True)
class VerifyPolicy:
    """How many drafted tokens each request verifies per round: ``fixed`` all G, or at most ``cap``
    (``fixed=K``: with narrow rounds a round of K + 1 positions rounded up to a power of two, for batches where
    a whole block costs more than it yields); ``threshold`` the leading positions with sigmoid(confidence) >=
    threshold; ``schedule`` the batch-wide scheduler of DSPARK.md §5.

    ``draft_rows``: with more live rows than this, a round is a plain step (one position per row, nothing
    verified, the draft's context kept current: ``DecodeBackend.round(..., draft=False)``), on backends that take
    it (``takes_plain_rounds``). Where a block costs more target steps than it yields (FP8 at 64 rows on an H200,
    docs/BENCH.md), a plain round, which drafts nothing, costs about a decoding step (the graph executor runs its
    draft graph once every G + 1 of them, for the context). Below it, rounds speculate again."""

    kind: str = "fixed"
    threshold: float = 0.5
    cap: int | None = None  # fixed: verify at most this many drafts (None: all G)
    sps: Mapping[int, float] | None = None
    temperatures: tuple[float, ...] | None = None  # Sequential Temperature Scaling of the confidence logits
    smoothed: bool = False
    draft_rows: int | None = None  # speculate only while at most this many rows are live (None: always)
    measured_on: DraftRowsOrigin | None = None  # where draft_rows was measured, for ``auto``

    def __post_init__(self) -> None:
        if self.draft_rows is not None and self.draft_rows < 0:
            raise UsageError(f"--draft-rows (draft_rows) must be a number of rows >= 0 (0: never draft), found "
                             f"{self.draft_rows}")

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> VerifyPolicy:
        text = text.strip()
        if text in ("fixed", "schedule"):
            return cls(text, **kwargs)
        if text.startswith("fixed="):
            value = text.partition("=")[2]
            if not (value.isascii() and value.isdigit()):
                raise UsageError(f"--verify {text!r}: the cap must be a whole number of drafts >= 0, e.g. fixed=3")
            return cls("fixed", cap=int(value), **kwargs)
        if text.startswith("threshold"):
            _, _, value = text.partition("=")
            try:
                thr = float(value) if value else 0.5
            except ValueError:
                raise UsageError(
                    f"--verify {text!r}: the threshold must be a number in [0, 1], e.g. threshold=0.5") from None
            if not 0.0 <= thr <= 1.0:
                raise UsageError(f"--verify {text!r}: the threshold must be in [0, 1], found {thr}")
            return cls("threshold", threshold=thr, **kwargs)
        raise UsageError(f"--verify {text!r} is not a verification mode; use fixed, fixed=K, threshold=X or schedule")

    @classmethod
    def for_build(cls, directory: Path, verify: str, *, has_confidence: bool,
                  draft_rows: int | str | None = None) -> VerifyPolicy:
        """The policy for a build (or Triton model) directory, with its ``sps_profile.json`` (`dspark-compile
        profile`) and ``calibration.json`` (`calibrate`); ``auto``: ``schedule`` when the profile exists and the
        draft has a confidence head, else ``fixed``. ``draft_rows``: as the field (a Triton parameter's string);
        ``"auto"``: what `dspark-compile bench --plain-rounds` measured for this build (:func:`measured_draft_rows`)."""
        draft_rows = parse_draft_rows(draft_rows)
        measured = None
        if draft_rows == "auto":
            draft_rows, measured = measured_draft_rows(directory)
        prof = directory / "sps_profile.json"
        if verify == "auto":
            verify = "schedule" if prof.is_file() and has_confidence else "fixed"
        if verify != "schedule":
            return cls.parse(verify, draft_rows=draft_rows, measured_on=measured)
        if not prof.is_file():
            raise UsageError(f"{prof}: missing; run `dspark-compile profile BUILD_DIR` before --verify schedule")
        try:
            data = json.loads(prof.read_text())
            sps = {int(b): float(v) for b, v in zip(data["batch_sizes"], data["steps_per_second"], strict=True)}
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{prof}: not a valid SPS profile ({e}); run `dspark-compile profile` again") from None
        temps = None
        cal = directory / "calibration.json"
        if cal.is_file():
            try:
                temps = tuple(float(t) for t in json.loads(cal.read_text())["temperatures"])
            except (ValueError, KeyError, TypeError) as e:
                raise UsageError(f"{cal}: not a valid calibration ({e}); run `dspark-compile calibrate` "
                                 "again") from None
        return cls("schedule", sps=sps, temperatures=temps, draft_rows=draft_rows, measured_on=measured)

    def probabilities(self, confidence_logits: np.ndarray) -> np.ndarray:
        logits = confidence_logits.astype(np.float64)
        if self.temperatures is not None:
            logits = logits / np.asarray(self.temperatures[: logits.shape[1]], dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-logits))

    def lengths(self, confidence_logits: np.ndarray, block: int, *, whole_block: bool = False,
                widest: bool = False, drafted: np.ndarray | None = None) -> np.ndarray:
        """ℓ per row. ``whole_block``: the backend's round verifies all G+1 positions of every row whatever ℓ
        is (``DecodeBackend.verifies_whole_block``), so the scheduler's cost term is that fixed width;
        ``widest``: as many positions as the longest ℓ needs (``verifies_widest``, scheduler.round_width).
        ``drafted`` [R]: the drafts each row has (a round that drafted nothing left none); ℓ never exceeds it."""
        ell = self._lengths(confidence_logits, block, whole_block, widest, drafted)
        return ell if drafted is None or self.kind == "fixed" else np.minimum(ell, drafted)

    def _lengths(self, confidence_logits: np.ndarray, block: int, whole_block: bool, widest: bool,
                 drafted: np.ndarray | None) -> np.ndarray:
        if self.kind == "fixed":
            from dspark_compile.runtime.scheduler import fixed_lengths

            every = np.full(confidence_logits.shape[0], block, dtype=np.int64)
            return fixed_lengths(every if drafted is None else drafted, block if self.cap is None else self.cap)
        probs = self.probabilities(confidence_logits)
        if drafted is not None:  # a missing draft survives with probability 0: the scheduler spends nothing on it
            probs = np.where(np.arange(probs.shape[1]) < drafted[:, None], probs, 0.0)
        if self.kind == "threshold":
            from dspark_compile.runtime.scheduler import threshold_lengths

            return np.asarray(threshold_lengths(probs.tolist(), self.threshold), dtype=np.int64)
        from dspark_compile.runtime.scheduler import schedule, schedule_smoothed

        fn = schedule_smoothed if self.smoothed else schedule
        width = confidence_logits.shape[0] * (block + 1) if whole_block else None
        return np.asarray(fn(probs, self._curve, verify_width=width, widest=block if widest and not whole_block
                             else None), dtype=np.int64)

    def check_backend(self, backend: Any) -> None:
        """One error line, before any work, when ``draft_rows`` is set and ``backend`` cannot skip the draft."""
        if self.draft_rows is not None and not getattr(backend, "takes_plain_rounds", False):
            raise UsageError(f"draft_rows={self.draft_rows}: {type(backend).__name__} takes no plain rounds "
                             "(round(..., draft=False)); use the CUDA-graph backend or the graph executor, or leave "
                             "draft_rows unset")

    def warn_if_measured_elsewhere(self, backend: Any) -> None:
        """One warning line, once where a run or a model loads, when ``draft_rows`` was measured (``auto``) with
        another backend or on another GPU than ``backend``'s: where speculation stops paying differs between them
        (at 64 rows FP8 speculation lost to plain decoding on an H200 and won on an H100, docs/BENCH.md)."""
        m = self.measured_on
        if m is None:
            return
        backend_here, device_here = str(describe_backend(backend).get("backend")), backend_device(backend)
        other_backend = m.backend is not None and m.backend != backend_here
        if not other_backend and (m.device is None or m.device == device_here):
            return
        fix = ("`bench` measures only the torch CUDA-graph backend: pass a number of rows for this one"
               if other_backend else "measure on this GPU (`dspark-compile bench BUILD --plain-rounds --prompt-file "
               "P`), or pass a number of rows")
        log.warning("--draft-rows auto: %s was measured with %s on %s; this run decodes with %s on %s, so the number "
                    "may not hold here; %s", m.path, m.backend or "?", m.device or "?", backend_here, device_here, fix)

    def plan(self, pending: Proposal, *, drafted: np.ndarray | None = None, whole_block: bool = False,
             widest: bool = False) -> tuple[np.ndarray, bool]:
        """The next round over ``pending``'s rows: each row's verify length (:meth:`lengths`), and whether it
        drafts (False: a plain step over ``draft_rows``, which verifies nothing). ``drafted``: the drafts each
        row will have, where a round still in flight decides it (RoundQueue); else ``pending``'s (−1: none). The
        one rule every decode loop (generate, the benchmark's, the server's batcher) asks."""
        rows, g = pending.drafts.shape
        if g == 0 or (self.draft_rows is not None and rows > self.draft_rows):
            return np.zeros(rows, dtype=np.int64), g == 0
        if drafted is None:
            drafted = np.cumprod(pending.drafts >= 0, axis=1).sum(axis=1)
        return self.lengths(pending.confidence_logits, g, drafted=drafted, whole_block=whole_block,
                            widest=widest), True

    @cached_property
    def _curve(self) -> Any:
        """The SPS curve, built (sorted, checked) once rather than every round."""
        from dspark_compile.runtime.scheduler import SpsCurve

        if self.sps is None:
            raise UsageError("--verify schedule needs an SPS profile (run `dspark-compile profile BUILD_DIR`)")
        return SpsCurve.from_mapping(self.sps)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    policy: VerifyPolicy = field(default_factory=VerifyPolicy)
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens (max_new_tokens) must be >= 1, found {self.max_new_tokens}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"--temperature (temperature) must be >= 0 (0 = greedy), found {self.temperature}")


@dataclass
class GenerationResult:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # empty for target-only decoding
    speculative: bool = True

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target step, the bonus token counted (1.0 for target-only decoding)."""
        if not self.speculative:
            return 1.0
        return float(np.mean([r["accepted"] for r in self.rounds])) if self.rounds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "rounds": self.rounds, "mean_accepted": self.mean_accepted}


@dataclass
class _Request:
    index: int
    prompt: list[int]
    result: GenerationResult
    generated: int = 0  # tokens produced so far, before truncation
    done: bool = False


RoundCallback = Callable[[int, list[int], dict[str, Any]], None]


def request_seed(seed: int, index: int) -> int:
    """Request ``index``'s own seed (63 bits) derived from the call's seed: a request decodes the same alone
    (``generate([prompt], seeds=[request_seed(seed, index)])``) as inside its batch."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def validate_prompts(prompts: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    """``prompts`` as lists of ints; one error line for none, an empty one or an id outside ``[0, vocab)``."""
    if not prompts:
        raise UsageError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise UsageError(f"prompt {i} is empty; give at least one token id")
        bad = [t for t in ids if t < 0 or t >= vocab]
        if bad:
            raise UsageError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        out.append(ids)
    return out


class RoundQueue:
    """The rounds a decode loop has launched and not yet collected, each with its rows and verify lengths.

    ``ahead``: how many it keeps launched (DecodeBackend.launch): the backend's ``rounds_in_flight`` where each
    round's verify lengths are known before the round ahead of it is collected (VerifyPolicy "fixed", or
    target-only), else 1, driven through ``round``. The loop decides which rounds are sure to run."""

    def __init__(self, backend: DecodeBackend, policy: VerifyPolicy, g: int) -> None:
        policy.check_backend(backend)
        self.backend: Any = backend
        self.policy, self.g = policy, g
        self._shape = verify_shape(backend)
        self.ahead = 1
        if hasattr(backend, "launch") and (g == 0 or policy.kind == "fixed"):
            self.ahead = max(1, int(getattr(backend, "rounds_in_flight", 1)))
        self._queued: deque[tuple[Any, np.ndarray, bool]] = deque()

    def __len__(self) -> int:
        return len(self._queued)

    def wants(self, generated: np.ndarray, ended: bool, max_new_tokens: int) -> bool:
        """Whether to launch one more round behind those queued: there is room, and it is sure to run — no row can
        reach its length before it (an EOS can still end one, whose row that round then runs for nothing), and no
        row has ended (``ended``): the queue then drains, so the loop drops the row before the next launch."""
        if not self._queued:
            return True
        return (len(self._queued) < self.ahead and not ended
                and bool((generated + len(self._queued) * (self.g + 1) <= max_new_tokens).all()))

    def launch(self, rows: Any, pending: Proposal) -> None:
        """Queue a round over ``rows`` verifying ``pending``'s drafts, as many as the policy plans
        (:meth:`VerifyPolicy.plan`; none: target-only, or a round that drafts nothing)."""
        drafted = None
        if self._queued:  # the round in flight drafts what this one verifies: all G, or none if it drafts nothing
            drafted = np.full(len(pending.drafts), self.g if self._queued[-1][2] else 0, dtype=np.int64)
        verify_len, draft = self.policy.plan(pending, drafted=drafted, **self._shape)
        if self.ahead > 1:
            self.backend.launch(verify_len, **round_kwargs(draft))
        self._queued.append((rows, verify_len, draft))

    def admit(self, rows: Any, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray, max_new_tokens: int) -> Proposal:
        """``backend.admit`` for a batch admitted alone (nothing live, nothing queued). Where the backend
        ``queues_admission`` and this queue runs ahead, the rounds sure to run over ``rows`` are launched behind
        the admission before its one sync: the device goes from the prefill into round 1 instead of idling while
        the host turns round (a row whose first token ends it runs those rounds for nothing, as any queued round).
        Their verify lengths need no drafts: an admission drafts a whole block, and the queue's policy is fixed."""
        backend = self.backend
        if self.ahead == 1 or not getattr(backend, "queues_admission", False):
            return backend.admit(input_ids, lengths, temperature, seeds)
        assert not self._queued, "admit() with rounds queued"
        backend.admit_queued(input_ids, lengths, temperature, seeds)
        n = len(lengths)
        whole = Proposal(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
                         np.zeros((n, self.g), dtype=np.int64), np.zeros((n, self.g), dtype=np.float32))
        while self.wants(np.ones(n, dtype=np.int64), False, max_new_tokens):
            self.launch(rows, whole)
        return backend.admitted()

    def collect(self) -> tuple[Any, np.ndarray, Proposal]:
        """The oldest round launched: its rows, verify lengths and Proposal."""
        rows, verify_len, draft = self._queued.popleft()
        out = self.backend.collect() if self.ahead > 1 else self.backend.round(verify_len, **round_kwargs(draft))
        return rows, verify_len, out


def verify_shape(backend: Any) -> dict[str, bool]:
    """:meth:`VerifyPolicy.plan`'s ``whole_block`` and ``widest`` for ``backend`` (its ``verifies_whole_block`` and
    ``verifies_widest``): what a round costs there, so every decode loop plans a backend's rounds alike."""
    return {"whole_block": bool(getattr(backend, "verifies_whole_block", False)),
            "widest": bool(getattr(backend, "verifies_widest", False))}


def round_kwargs(draft: bool) -> dict[str, bool]:
    """``round``/``launch``'s keywords for a round :meth:`VerifyPolicy.plan` gave ``draft``: ``draft=False`` only
    for a plain round (only backends with ``takes_plain_rounds`` take it)."""
    return {} if draft else {"draft": False}


def generate(backend: DecodeBackend, prompts: Sequence[Sequence[int]], params: GenerationParams,
             on_round: RoundCallback | None = None, *, speculative: bool = True,
             seeds: Sequence[int] | None = None) -> list[GenerationResult]:
    """Decode ``prompts`` as one batch (``speculative=False``: target-only, the same graphs with G = 0);
    ``on_round(request_index, new_tokens, round)`` streams committed tokens, request ``i`` draws from ``seeds[i]``."""
    info = backend.info
    prompts = validate_prompts(prompts, info.vocab_size)
    g = info.block_size if speculative else 0
    if params.policy.kind != "fixed" and speculative and not info.has_confidence:
        raise UsageError(f"--verify {params.policy.kind} needs a draft with a confidence head; use --verify fixed")
    if params.temperature > 0 and not info.sampling:
        raise UsageError("these graphs were built for greedy verification only; rebuild with --verify-mode sampling "
                         "or use temperature 0")
    slots = cache_slots_needed(max(len(p) for p in prompts), params.max_new_tokens, g)
    if info.max_slots is not None and slots > info.max_slots:
        raise UsageError(f"prompt + max_new_tokens need {slots} cache slots but the build allows {info.max_slots}; "
                         "shorten the prompt or rebuild with a larger --max-context")
    if seeds is None:
        seeds = [request_seed(params.seed, i) for i in range(len(prompts))]
    elif len(seeds) != len(prompts):
        raise UsageError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    queued = RoundQueue(backend, params.policy, g)  # checks the policy against the backend before any work
    reqs = [_Request(i, p, GenerationResult(prompt=p, speculative=g > 0)) for i, p in enumerate(prompts)]
    bsz = len(reqs)
    backend.start(bsz, slots, speculative=speculative)
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    ids = np.zeros((bsz, int(lengths.max())), dtype=np.int64)
    for r in reqs:
        ids[r.index, : len(r.prompt)] = r.prompt
    first = queued.admit(reqs, ids, lengths, np.full(bsz, params.temperature, dtype=np.float32),
                         np.asarray(seeds, dtype=np.int64), params.max_new_tokens)
    for r in reqs:
        _commit(r, [int(first.next_token[r.index])], params, info.eos_token_ids, on_round, None)
    active = reqs
    pending = first  # the drafts (and their confidences) the next round verifies
    while True:
        if not queued:
            still = [i for i, r in enumerate(active) if not r.done]
            if not still:
                break
            if len(still) < len(active):
                rows = np.array(still, dtype=np.int64)
                backend.select(rows)
                active = [active[i] for i in still]
                pending = Proposal(pending.accepted[rows], pending.next_token[rows], pending.drafts[rows],
                                   pending.confidence_logits[rows])
        while queued.wants(np.array([r.generated for r in active]), any(r.done for r in active),
                           params.max_new_tokens):
            queued.launch(active, pending)
        rows_of, verify_len, out = queued.collect()
        _commit_round(rows_of, pending, out, verify_len, params, backend.info.eos_token_ids, g, on_round)
        pending = out
    return [r.result for r in reqs]


def _commit_round(active: list[_Request], pending: Proposal, out: Proposal, verify_len: np.ndarray,
                  params: GenerationParams, eos: tuple[int, ...], g: int, on_round: RoundCallback | None) -> None:
    """Commit a round's tokens: the accepted prefix of the ``pending`` drafts it verified and its next token.
    A request that ended in the round before (run once more behind it) takes nothing."""
    for i, r in enumerate(active):
        if r.done:
            continue
        j = int(out.accepted[i])
        ell = int(verify_len[i])
        new = [int(t) for t in pending.drafts[i, :j]] + [int(out.next_token[i])]
        rnd: dict[str, Any] = {"draft": [int(t) for t in pending.drafts[i, :ell]], "accepted": j + 1}
        if g > 0:
            rnd["confidence_logits"] = [round(float(c), 6) for c in pending.confidence_logits[i, :ell]]
        _commit(r, new, params, eos, on_round, rnd)


def _commit(r: _Request, new: list[int], params: GenerationParams, eos: tuple[int, ...],
            on_round: RoundCallback | None, rnd: dict[str, Any] | None) -> None:
    if rnd is not None and r.result.speculative:
        r.result.rounds.append(rnd)
    room = params.max_new_tokens - len(r.result.tokens)
    visible = new[: max(room, 0)]
    first_eos = next((k for k, t in enumerate(visible) if t in eos), None) if params.stop_on_eos else None
    hit_eos = first_eos is not None
    if hit_eos:
        visible = visible[: first_eos + 1]
    r.result.tokens.extend(visible)
    r.generated += len(new)
    if on_round is not None and (visible or rnd is not None):
        on_round(r.index, visible, rnd or {})
    # The reference evaluator keeps drafting while generated <= max_new_tokens (see module docstring).
    if hit_eos or r.generated > params.max_new_tokens:
        r.done = True
