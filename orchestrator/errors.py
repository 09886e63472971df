"""The errors of the engine, one family per kind of mistake.

Each message names its culprit (the file and line, the step, the flow, the role, the host, the
subject, the key) in one line, so a command line can print ``str(exc)`` and nothing else.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(OrchestratorError, ValueError):
    """A setting has a value we cannot use; the message names the variable."""


class DefinitionError(OrchestratorError, ValueError):
    """A step or a flow defined in a way that cannot work (raised when the app is defined)."""


class SubmitError(OrchestratorError, ValueError):
    """A request refused before anything was recorded or sent."""


class UnknownFlow(SubmitError, LookupError):
    pass


class SubjectBusy(SubmitError):
    """Another operation on the same subject is in flight."""


class BrokerUnavailable(SubmitError):
    """The first step could not be queued; the operation was recorded as failed."""


class UnknownOperation(OrchestratorError, LookupError):
    pass


class StepMismatch(OrchestratorError, ValueError):
    """A step message that contradicts the operation's plan (wrong step name or host)."""


class SchemaError(OrchestratorError, RuntimeError):
    """The database schema is not the one this code needs; the message says what to run."""


class LedgerUnavailable(OrchestratorError, ConnectionError):
    """The ledger's database does not answer (refused, cut, locked for too long). A reason to
    wait and try again, never a verdict on an operation; the message names the database,
    without its password."""


class StepFailure(RuntimeError):
    """Raised by a step: the step failed for good. The operation fails, after running its
    flow's rollback steps when the failed step is one of the flow's ``rollback_on``. Any other
    exception is retried (``Orchestrator(max_retries=...)``) before it fails the operation."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of what ``exc`` says (a driver's or a broker's error can run to many
    lines), or its class's name when it says nothing: for one-line messages and logs."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip()[:limit] if lines else type(exc).__name__
