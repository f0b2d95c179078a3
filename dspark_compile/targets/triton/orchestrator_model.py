"""The ``dspark`` Triton model (python backend, decoupled): runs the DSpark loop and streams tokens.

Copied into the repository as ``dspark/1/model.py``. Each request carries ``prompt_ids`` (INT64 [-1]) and
optional ``max_new_tokens`` (INT32 [1]), ``temperature`` (FP32 [1]), ``seed`` (INT64 [1]); the model answers
with one response per decode round (``tokens`` = the newly committed ids, ``accepted`` = tokens that round
committed) and then the final flag. Invalid requests get one error response; the model keeps serving.

``execute`` only validates and queues: a worker thread batches the queued requests into one
:func:`~dspark_compile.runtime.decode.generate` call and streams from its round callback, so concurrent
requests share the graphs' batch dimension. Greedy requests are batched together; a sampling request runs
alone (one temperature per call); each row draws from its own request's seed.

The config's ``backend_mode`` picks the transport of the one graph executor
(:class:`~dspark_compile.runtime.executor.GraphExecutor`, which keeps the caches in this process):
- ``bls``: the engine models of the same repository, through BLS calls (:class:`BlsTransport`: tensors
  passed by DLPack where they live, GPU tensors stay on the GPU); GPU servers.
- ``onnxruntime_inprocess``: the onnxruntime transport in this process, on the build directory ``build_dir``
  (relative to the repository); for servers that have only the python backend (the CPU tests here).
- ``factory``: ``backend_factory`` (``module:callable``) called with ``build_dir``; any other in-process
  DecodeBackend, e.g. the PyTorch reference.
"""

from __future__ import annotations

import re
import site
import sys
from pathlib import Path


def _extend_sys_path() -> None:
    """Put the ``python_path`` entries of our config.pbtxt on sys.path, before numpy is imported.

    The stub's interpreter is isolated (it ignores PYTHONPATH) and imports this file before ``initialize``
    sees the config, and protobuf is not importable yet, hence a regex over the text the writer produced.
    ``site.addsitedir`` also runs the ``.pth`` files there (editable installs).
    """
    config = Path(__file__).resolve().parents[1] / "config.pbtxt"
    if not config.is_file():
        return
    found = re.search(r'key:\s*"python_path"\s*value\s*\{\s*string_value:\s*"([^"]*)"', config.read_text())
    if not found:
        return
    root = config.parents[1]
    before = list(sys.path)
    for entry in filter(None, found.group(1).split(":")):
        site.addsitedir(str(root / entry))  # absolute entries stay absolute
    sys.path[:] = [p for p in sys.path if p not in before] + before


_extend_sys_path()

import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from torch.utils import dlpack  # noqa: E402

from dspark_compile.errors import DsparkError, UsageError  # noqa: E402
from dspark_compile.runtime.backend import DecodeBackend, ProgramInfo, cache_slots_needed  # noqa: E402
from dspark_compile.runtime.decode import GenerationParams, VerifyPolicy, generate  # noqa: E402
from dspark_compile.runtime.executor import GraphExecutor, load_weight_inputs  # noqa: E402
from dspark_compile.serving import llm_io  # noqa: E402
from dspark_compile.serving.batcher import STATS_ENV, ContinuousBatcher  # noqa: E402
from dspark_compile.serving.text import TextCodec  # noqa: E402

BACKEND_MODES = ("bls", "onnxruntime_inprocess", "factory")
CANCELLED = "the client cancelled the request"
SHUTTING_DOWN = "the server is shutting down"
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Requests and limits (transport-independent, unit-tested without Triton)


@dataclass(frozen=True)
class Limits:
    """What a request may ask for, fixed when the model loads."""

    vocab_size: int
    block_size: int
    max_context: int | None  # cache slots: prompt + max_new_tokens + G + 2 must fit (docs/PROGRAM.md)
    default_max_new_tokens: int
    sampling: bool

    @classmethod
    def of(cls, info: ProgramInfo, max_context: int | None, default_max_new_tokens: int) -> Limits:
        bounds = [b for b in (max_context, info.max_slots) if b is not None]
        return cls(info.vocab_size, info.block_size, min(bounds) if bounds else None, default_max_new_tokens,
                   info.sampling)


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    seed: int


def parse_request(inputs: Mapping[str, np.ndarray | None], limits: Limits) -> RequestSpec:
    """Check one request's tensors; raise UsageError naming the input and what is allowed."""
    prompt_ids = inputs.get("prompt_ids")
    if prompt_ids is None:
        raise UsageError("input `prompt_ids` (INT64 [n]) is missing")
    prompt = np.asarray(prompt_ids)
    if prompt.dtype != np.int64 or prompt.ndim != 1:
        raise UsageError(f"input `prompt_ids` must be INT64 with shape [n], found {prompt.dtype} "
                         f"{list(prompt.shape)}")
    if prompt.size == 0:
        raise UsageError("input `prompt_ids` is empty; give at least one token id")
    bad = prompt[(prompt < 0) | (prompt >= limits.vocab_size)]
    if bad.size:
        raise UsageError(f"input `prompt_ids`: token id {int(bad[0])} is outside the vocabulary "
                         f"[0, {limits.vocab_size})")
    max_new = _scalar(inputs, "max_new_tokens", np.int32, limits.default_max_new_tokens)
    if max_new < 1:
        raise UsageError(f"input `max_new_tokens` must be >= 1, found {max_new}")
    temperature = _scalar(inputs, "temperature", np.float32, 0.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"input `temperature` must be a finite number >= 0 (0 = greedy), found "
                         f"{temperature}")
    if temperature > 0 and not limits.sampling:
        raise UsageError("input `temperature` > 0 needs graphs built for sampling; send 0 or rebuild with "
                         "--verify-mode sampling")
    seed = _scalar(inputs, "seed", np.int64, None)
    if limits.max_context is not None:
        need = cache_slots_needed(prompt.size, max_new, limits.block_size)
        if need > limits.max_context:
            raise UsageError(f"prompt ({prompt.size} tokens) + max_new_tokens ({max_new}) need {need} cache "
                             f"slots but this model allows {limits.max_context}; shorten the prompt or "
                             "max_new_tokens")
    return RequestSpec([int(t) for t in prompt], int(max_new), float(temperature),
                       int(seed) if seed is not None else secrets.randbits(63))


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str, dtype: type, default: Any) -> Any:
    value = inputs.get(name)
    if value is None:
        return default
    array = np.asarray(value)
    if array.dtype != dtype or array.size != 1:
        raise UsageError(f"input `{name}` must be {np.dtype(dtype).name} with shape [1], found {array.dtype} "
                         f"{list(array.shape)}")
    return array.reshape(()).item()


# ----------------------------------------------------------------------------------------------------
# The batching worker


class Cancelled(ConnectionError):
    """A stream's client cancelled the request or went away."""


class Stream:
    """Where one request's answers go; the Triton adapter wraps a response sender."""

    stopped = False  # a text stream met a stop string or end id: the request ends now (read with getattr)

    def cancelled(self) -> bool:
        """The client cancelled the request or went away (checked before admission; sends check it too)."""
        return False

    def send(self, tokens: list[int], accepted: int) -> None:
        raise NotImplementedError

    def finish(self, error: str | None = None) -> None:
        raise NotImplementedError


@dataclass
class Job:
    spec: RequestSpec
    stream: Stream
    sent: int = 0
    finished: bool = False
    on_end: Callable[[str | None], None] | None = None  # the orchestrator's counters

    def deliver(self, tokens: list[int], accepted: int, eos: tuple[int, ...]) -> None:
        if self.finished:
            return
        tokens = tokens[: self.spec.max_new_tokens - self.sent]
        if tokens:
            self.sent += len(tokens)
            try:
                self.stream.send(tokens, accepted)
            except Cancelled:
                self.end(CANCELLED)  # Triton still wants the final flag to release it
                return
            except Exception as exc:  # the client went away: drop this request, not its whole batch
                log.warning("dspark: dropping a request whose stream failed: %s", exc)
                self.end(f"stream failed: {exc}")
                return
        stopped = getattr(self.stream, "stopped", False)
        if stopped or self.sent >= self.spec.max_new_tokens or (tokens and tokens[-1] in eos):
            self.end()

    def end(self, error: str | None = None) -> None:
        if not self.finished:
            self.finished = True
            if self.on_end is not None:
                self.on_end(error)
            try:
                self.stream.finish(error)
            except Exception as exc:
                log.warning("dspark: could not finish a request's stream: %s", exc)


@dataclass
class Orchestrator:
    """Queues validated requests and runs them in batches on one backend, from one worker thread."""

    backend: DecodeBackend
    max_batch: int = 16
    max_slots: int | None = None  # a batch needs max(prompt) + max(max_new_tokens) + G + 2 cache slots
    on_error: Callable[[str], None] = log.error
    policy: VerifyPolicy = field(default_factory=VerifyPolicy)  # verify lengths: fixed, threshold or scheduler
    speculative: bool = True  # False: target-only decoding with the same graphs (a baseline)
    batching: str = "static"  # continuous: requests join/leave between rounds (serving.batcher); needs max_slots
    stats_path: Path | None = None  # where stats() is written (JSON) when it changes; tests read it
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _draining: threading.Event = field(default_factory=threading.Event, init=False)
    _ended: dict[str, int] = field(default_factory=lambda: {"completed": 0, "failed": 0, "cancelled": 0},
                                   init=False)
    _batcher: ContinuousBatcher | None = field(default=None, init=False)
    _written: tuple[Any, ...] = field(default=(), init=False)
    _written_at: float = field(default=0.0, init=False)
    _queue: queue.Queue[Job | None] = field(default_factory=queue.Queue, init=False)
    _held: deque[Job] = field(default_factory=deque, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dspark-orchestrator", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Shutdown has begun: end every live and queued request with an error now, and each new one on arrival,
        so the server's HTTP/gRPC connections close and it unloads the model within its exit timeout."""
        self._draining.set()
        self._queue.put(None)  # wake the worker if it waits for work

    def submit(self, job: Job) -> None:
        job.on_end = self._count_end
        self._queue.put(job)

    def _count_end(self, error: str | None) -> None:
        kind = "completed" if error is None else "cancelled" if error == CANCELLED else "failed"
        self._ended[kind] += 1

    def stats(self) -> dict[str, Any]:
        """Rows and requests right now, and counters since the model loaded (what the fault tests check)."""
        b = self._batcher
        rows = b.rows if b is not None else self.max_batch
        live = len(b.live) if b is not None else 0
        return {"rows": rows, "live": live, "free_rows": rows - live, "slots": self.max_slots,
                "queued": self._queue.qsize() + len(self._held), **self._ended,
                **(b.counters if b is not None else {}),
                **({"host_seconds": {k: round(v, 3) for k, v in b.seconds.items()}} if b is not None else {})}

    def _write_stats(self, force: bool = False) -> None:
        """Write stats() to ``stats_path`` when it changed: at once when idle (``force``), else at most 5 per s."""
        if self.stats_path is None:
            return
        stats = self.stats()
        key = tuple(stats.values())
        now = time.monotonic()
        if key == self._written or (not force and now - self._written_at < 0.2):
            return
        tmp = self.stats_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(stats))
            os.replace(tmp, self.stats_path)
        except OSError as exc:  # never let the stats take the worker (and every request) down
            self.on_error(f"dspark: cannot write stats to {self.stats_path} ({exc}); stats are off")
            self.stats_path = None
            return
        self._written, self._written_at = key, now

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
        while True:
            try:
                job = self._held.popleft() if self._held else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.end("the model is being unloaded")

    def _loop(self) -> None:
        if self.batching == "continuous" and self.max_slots is not None:
            self._continuous_loop()
            return
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _continuous_loop(self) -> None:
        """Admit queued requests into free rows between rounds (blocking only while nothing runs)."""
        assert self.max_slots is not None
        batcher = self._batcher = ContinuousBatcher(self.backend, rows=self.max_batch, slots=self.max_slots,
                                                    policy=self.policy, speculative=self.speculative,
                                                    on_error=self.on_error)
        while not self._stopping.is_set():
            incoming: list[Job] = []
            while len(incoming) < batcher.free_rows:
                idle = not batcher.busy and not incoming
                if idle:
                    self._write_stats(force=True)
                try:
                    job = self._queue.get(block=idle)
                except queue.Empty:
                    break
                if job is None:
                    break
                if self._draining.is_set():
                    job.end(SHUTTING_DOWN)
                    continue
                if job.stream.cancelled():  # gone while queued: never admitted
                    job.end(CANCELLED)
                    continue
                incoming.append(job)
            if self._stopping.is_set():
                for job in incoming:
                    job.end("the model is being unloaded")
                break
            if self._draining.is_set():
                batcher.end_all(SHUTTING_DOWN)
                for job in incoming:
                    job.end(SHUTTING_DOWN)
                continue
            batcher.step(incoming)
            self._write_stats()
        batcher.end_all("the model is being unloaded")
        self._write_stats(force=True)

    def _next_batch(self) -> list[Job] | None:
        head = self._held.popleft() if self._held else self._queue.get()
        if head is None:
            return None
        batch = [head]
        # A sampling request runs alone: generate() takes one temperature per call.
        while head.spec.temperature == 0 and len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            (batch if job.spec.temperature == 0 and self._fits([*batch, job]) else self._held).append(job)
        return batch

    def _fits(self, jobs: list[Job]) -> bool:
        if self.max_slots is None:
            return True
        need = cache_slots_needed(max(len(j.spec.prompt) for j in jobs), max(j.spec.max_new_tokens for j in jobs),
                                  self.backend.info.block_size)
        return need <= self.max_slots

    def _run(self, batch: list[Job]) -> None:
        head = batch[0].spec
        params = GenerationParams(max_new_tokens=max(j.spec.max_new_tokens for j in batch),
                                  temperature=head.temperature, seed=head.seed, policy=self.policy)
        eos = self.backend.info.eos_token_ids

        def on_round(index: int, tokens: list[int], rnd: dict[str, Any]) -> None:
            batch[index].deliver(tokens, int(rnd.get("accepted", len(tokens))), eos)

        try:
            generate(self.backend, [j.spec.prompt for j in batch], params, on_round,
                     seeds=[j.spec.seed for j in batch], speculative=self.speculative)
        except DsparkError as exc:
            error = exc.one_line()
        except Exception as exc:  # a backend failure must not take the model down with it
            self.on_error(f"dspark: generation failed: {traceback.format_exc()}")
            error = f"internal error in the DSpark orchestrator: {type(exc).__name__}: {exc}"
        else:
            error = None
        for job in batch:
            job.end(error)


# ----------------------------------------------------------------------------------------------------
# BLS backend: the two graphs as models of the same Triton server


class BlsError(RuntimeError):
    """A BLS call to one of the engine models failed."""


@dataclass
class BlsTransport:
    """Runs each graph as a model of the same Triton server through BLS (the graphs are stateless).

    Tensors cross by DLPack where they live: the executor's GPU caches are handed to the engine models without
    a host copy, and outputs are read back by DLPack into the executor's buffers (a device-local copy).
    """

    models: Mapping[str, str]  # graph -> Triton model name
    signatures: Mapping[str, Mapping[str, Any]]  # graph -> {"inputs": [TritonTensor JSON], "outputs": [...]}
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def has_graph(self, graph: str) -> bool:
        return graph in self.models

    def inputs(self, graph: str) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.signatures[graph]["inputs"])

    def outputs(self, graph: str) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.signatures[graph]["outputs"])

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        tensors = []
        for name in self.inputs(graph):
            if feeds.get(name) is None:
                raise BlsError(f"graph {graph} needs input `{name}`, which the executor did not provide")
            tensors.append(pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(feeds[name].contiguous())))
        request = pb_utils.InferenceRequest(model_name=self.models[graph], requested_output_names=list(outputs),
                                            inputs=tensors)
        response = request.exec()
        if response.has_error():
            raise BlsError(f"model {self.models[graph]}: {response.error().message()}")
        for name, buffer in outputs.items():
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise BlsError(f"model {self.models[graph]} returned no `{name}`")
            buffer.copy_(dlpack.from_dlpack(tensor.to_dlpack()))


def bls_executor(text: str, repository: Path) -> GraphExecutor:
    """The executor over BLS from the ``model_info`` parameter the repository writer put in config.pbtxt; the
    graphs' weight inputs are read once from the files it names in ``repository`` and handed to every call."""
    raw = json.loads(text)
    transport = BlsTransport(raw["models"], raw["signatures"])
    weights = load_weight_inputs(repository, raw, transport.device)
    return GraphExecutor(ProgramInfo.from_json(raw["info"]), transport, weights)


# ----------------------------------------------------------------------------------------------------
# Triton glue


class _SenderStream(Stream):
    def __init__(self, sender: Any) -> None:
        self.sender = sender

    def cancelled(self) -> bool:
        return bool(self.sender.is_cancelled())

    def send(self, tokens: list[int], accepted: int) -> None:
        if self.sender.is_cancelled():
            raise Cancelled(CANCELLED)
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("tokens", np.asarray(tokens, dtype=np.int64)),
            pb_utils.Tensor("accepted", np.asarray([accepted], dtype=np.int32)),
        ]))

    def finish(self, error: str | None = None) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if error is None:
            self.sender.send(flags=final)
        else:
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)), flags=final)


class _TextSenderStream(_SenderStream):
    """A text request (``text_input``): responses carry ``text_output`` (see :mod:`dspark_compile.serving.llm_io`)."""

    def __init__(self, sender: Any, reply: llm_io.TextReply) -> None:
        super().__init__(sender)
        self.reply = reply

    @property
    def stopped(self) -> bool:  # type: ignore[override]
        return self.reply.stopped

    def send(self, tokens: list[int], accepted: int) -> None:
        if self.sender.is_cancelled():
            raise Cancelled(CANCELLED)
        out = self.reply.round(tokens)
        if out is not None:
            self.sender.send(self._response(*out, accepted))

    def finish(self, error: str | None = None) -> None:
        out = self.reply.final() if error is None else None
        if out is not None:
            self.sender.send(self._response(*out, 0), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            super().finish(error)

    @staticmethod
    def _response(text: str, ids: list[int], accepted: int) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", llm_io.text_tensor(text)),
            pb_utils.Tensor("tokens", np.asarray(ids, dtype=np.int64)),
            pb_utils.Tensor("accepted", np.asarray([accepted], dtype=np.int32)),
        ])


def load_backend(parameters: Mapping[str, str], repository: Path) -> DecodeBackend:
    mode = parameters.get("backend_mode", "")
    if mode not in BACKEND_MODES:
        raise UsageError(f"dspark/config.pbtxt: parameter `backend_mode` is {mode!r}; expected one of "
                         f"{', '.join(BACKEND_MODES)}")
    if mode == "bls":
        return bls_executor(parameters["model_info"], repository)
    build_dir = repository / parameters["build_dir"]
    if mode == "onnxruntime_inprocess":
        from dspark_compile.runtime.onnxruntime_backend import load_onnxruntime

        return load_onnxruntime(build_dir)
    module, _, attr = parameters["backend_factory"].partition(":")
    factory: Any = importlib.import_module(module)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(build_dir)


class TritonPythonModel:
    """Triton's entry points; all logic lives in :class:`Orchestrator` and :func:`parse_request`."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise UsageError("dspark/config.pbtxt: the orchestrator streams tokens and must be decoupled")
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        repository = Path(args["model_repository"]).parent
        backend = load_backend(parameters, repository)
        max_context = int(parameters["max_context"]) if parameters.get("max_context") else None
        self.limits = Limits.of(backend.info, max_context, int(parameters.get("default_max_new_tokens", 64)))
        # Verify lengths (DSPARK.md §5): `verify` = fixed | fixed=K | threshold=X | schedule | auto; the SPS profile
        # and calibration come from the build (in-process modes) or from this model's own directory (bls).
        # `draft_rows` (optional): rounds over more live rows draft nothing (VerifyPolicy.draft_rows).
        policy_dir = (repository / parameters["build_dir"] if parameters.get("build_dir")
                      else Path(args["model_repository"]))
        policy = VerifyPolicy.for_build(policy_dir, parameters.get("verify", "auto"),
                                        has_confidence=backend.info.has_confidence,
                                        draft_rows=parameters.get("draft_rows") or None)
        policy.check_backend(backend)  # a backend that cannot skip the draft fails the load, with the reason
        policy.warn_if_measured_elsewhere(backend)
        self.orchestrator = Orchestrator(backend, max_batch=int(parameters.get("max_batch", 16)),
                                         max_slots=self.limits.max_context,
                                         on_error=pb_utils.Logger.log_error, policy=policy,
                                         speculative=parameters.get("speculative", "true") != "false",
                                         batching=parameters.get("batching", "static"),
                                         stats_path=_stats_path(args.get("model_name", "dspark")))
        self.codec = TextCodec.find(Path(args["model_repository"]))  # tokenizer.json copied by the writer
        self.orchestrator.start()
        on_signal(signal.SIGTERM, self.orchestrator.drain)

    def execute(self, requests: Sequence[Any]) -> None:
        for request in requests:
            stream = _SenderStream(request.get_response_sender())
            try:
                inputs, text = llm_io.token_inputs(
                    {name: _input(request, name) for name in
                     ("prompt_ids", "max_new_tokens", "temperature", "seed", *llm_io.INPUT_NAMES)}, self.codec)
                spec = parse_request(inputs, self.limits)
                if text is not None and self.codec is not None:
                    stream = _TextSenderStream(stream.sender, llm_io.TextReply.create(
                        text, self.codec, self.orchestrator.backend.info.eos_token_ids))
            except DsparkError as exc:
                stream.finish(exc.one_line())
                continue
            except Exception as exc:  # never let one request take the model down
                pb_utils.Logger.log_error(f"dspark: bad request: {traceback.format_exc()}")
                stream.finish(f"invalid request: {type(exc).__name__}: {exc}")
                continue
            self.orchestrator.submit(Job(spec, stream))
        return None

    def finalize(self) -> None:
        self.orchestrator.stop()


def on_signal(signum: int, callback: Callable[[], None]) -> bool:
    """Call ``callback`` from a watcher thread when this process receives ``signum``.

    `dspark-compile serve` stops tritonserver with SIGTERM to its process group, so the stub gets it too (it
    ignores it by default). A Python handler alone would run only when the stub's main thread next enters
    Python, so the C-level handler's wakeup fd is read by a thread instead. Needs the main thread (False
    otherwise: then shutdown is Triton's own, in-flight streams drain until its exit timeout).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.signal(signum, lambda *_: None)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        while data := reader.recv(64):
            if signum in data:
                callback()

    threading.Thread(target=watch, name="dspark-signals", daemon=True).start()
    on_signal.keep = (reader, writer)  # type: ignore[attr-defined]  # the sockets live as long as the process
    return True


def _stats_path(model: str) -> Path | None:
    """``$DSPARK_STATS_FILE`` with ``{model}`` replaced by this model's name (several models, one server)."""
    value = os.environ.get(STATS_ENV)
    return Path(value.replace("{model}", model)) if value else None


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
