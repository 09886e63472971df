"""A simulated hypervisor: each step takes time and can be made to fail, by step name.

Tests and the demo use it to catch an operation inside a given step: a long
``resize_instance`` leaves time to send SIGTERM while it runs.

- ``ORCHESTRATOR_STEP_DELAY``: seconds every step takes (default 0.1);
- ``ORCHESTRATOR_STEP_DELAYS``: per-step overrides, ``resize_instance=5,finish_resize=1``;
- ``ORCHESTRATOR_FAIL_STEPS``: steps that fail, ``finish_resize`` or ``finish_resize@compute2``;
- ``ORCHESTRATOR_CRASH_STEPS``: steps whose first delivery raises an unexpected error (as a
  lost database connection would), same syntax; ``ORCHESTRATOR_CRASH_DELIVERIES``: how many
  deliveries crash (default 1), by the attempt the ledger counts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from nova_app.flows import STEP_NAMES
from orchestrator import ConfigError, StepFailure

__all__ = ["Hypervisor", "StepFailure"]

DEFAULT_STEP_DELAY = 0.1
POLL_SECONDS = 0.1


def _parse_delays(raw: str) -> dict[str, float]:
    delays: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        step, sep, value = item.partition("=")
        if not sep or step not in STEP_NAMES:
            raise ConfigError(
                f"ORCHESTRATOR_STEP_DELAYS: {item!r} is not <step>=<seconds> with a known step"
            )
        try:
            delays[step] = float(value)
        except ValueError:
            raise ConfigError(f"ORCHESTRATOR_STEP_DELAYS: {item!r}: not a number") from None
    return delays


def _parse_failures(raw: str) -> set[tuple[str, str | None]]:
    failures: set[tuple[str, str | None]] = set()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        step, _, host = item.partition("@")
        if step not in STEP_NAMES:
            raise ConfigError(f"ORCHESTRATOR_FAIL_STEPS: unknown step {step!r}")
        failures.add((step, host or None))
    return failures


def _crash_deliveries() -> int:
    raw = os.environ.get("ORCHESTRATOR_CRASH_DELIVERIES") or "1"
    if not raw.isdigit():
        raise ConfigError(f"ORCHESTRATOR_CRASH_DELIVERIES={raw!r}: not a whole number")
    return int(raw)


@dataclass(frozen=True)
class Hypervisor:
    default_delay: float
    delays: dict[str, float]
    failures: frozenset[tuple[str, str | None]]
    crashes: frozenset[tuple[str, str | None]] = frozenset()
    crash_deliveries: int = 1

    @classmethod
    def from_env(cls) -> Hypervisor:
        try:
            default = float(os.environ.get("ORCHESTRATOR_STEP_DELAY") or DEFAULT_STEP_DELAY)
        except ValueError:
            raise ConfigError("ORCHESTRATOR_STEP_DELAY: not a number") from None
        return cls(
            default_delay=default,
            delays=_parse_delays(os.environ.get("ORCHESTRATOR_STEP_DELAYS", "")),
            failures=frozenset(_parse_failures(os.environ.get("ORCHESTRATOR_FAIL_STEPS", ""))),
            crashes=frozenset(_parse_failures(os.environ.get("ORCHESTRATOR_CRASH_STEPS", ""))),
            crash_deliveries=_crash_deliveries(),
        )

    def delay(self, step: str) -> float:
        return self.delays.get(step, self.default_delay)

    def perform(
        self, step: str, host: str, poll: Callable[[], bool] | None = None, attempt: int = 1
    ) -> None:
        """Do the step's (simulated) work on ``host``: take its time, or fail as injected.

        ``poll`` is asked every ``POLL_SECONDS`` while the work lasts: True finishes it at
        once (a forced completion); it raises StepFailure to abort it.
        """
        crashes = (step, None) in self.crashes or (step, host) in self.crashes
        if crashes and attempt <= self.crash_deliveries:
            raise RuntimeError(f"injected crash: {step} on {host}")
        end = time.monotonic() + self.delay(step)
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, POLL_SECONDS))
            if poll is not None and poll():
                break
        if (step, None) in self.failures or (step, host) in self.failures:
            raise StepFailure(f"injected failure: {step} on {host}")
