"""User-facing errors: each a :class:`DsparkError` whose message is one line naming the file or field, what
was expected, what was found and what to do; the CLI prints it and exits with its ``exit_code``. Bugs stay
ordinary exceptions (tracebacks).
"""

from __future__ import annotations


class DsparkError(Exception):
    """Base class of all user-facing errors (exit code 2)."""

    exit_code = 2

    def one_line(self) -> str:
        return " ".join(str(self).split())


class CheckpointError(DsparkError):
    """A checkpoint file or directory is missing, unreadable, corrupt or of an unsupported kind."""


class ValidationError(DsparkError):
    """The (target, draft) pair is inconsistent; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        head = self.problems[0] if self.problems else "validation failed"
        more = f" (+{len(self.problems) - 1} more problem(s); run `dspark-compile inspect` for all)" if len(
            self.problems
        ) > 1 else ""
        super().__init__(head + more)


class UsageError(DsparkError):
    """A flag, spec-file field or request parameter is invalid."""


class BuildError(DsparkError):
    """A build step failed because of its inputs (e.g. an engine builder rejected a graph)."""

    exit_code = 3


class BackendUnavailableError(DsparkError):
    """An optional dependency (onnxruntime, TensorRT, tritonserver, a GPU) is not installed or usable here."""

    exit_code = 4
