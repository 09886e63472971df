"""Flows: ordered plans of steps, each step run on the host that plays a role.

A flow names its steps and, for each, the *role* of the host that runs it (free strings:
``source``, ``dest``, ``primary``...). Submitting an operation resolves the roles to hosts and
stores the resulting plan, so every process (and a draining worker in particular) can tell
which hosts an operation still needs without knowing the flow's code.

A flow may also name rollback steps, run instead of the rest of the plan when one of the steps
in ``rollback_on`` fails (as Nova's ``_rollback_live_migration`` does).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Plan = list[list[str]]
StepRole = tuple[str, str]


@dataclass(frozen=True)
class Flow:
    name: str
    steps: tuple[StepRole, ...]
    rollback: tuple[StepRole, ...] = ()
    #: Names of the steps whose failure runs ``rollback``; a failure elsewhere just fails.
    rollback_on: frozenset[str] = frozenset()

    @property
    def roles(self) -> list[str]:
        """Every role the flow's steps and rollback name, in order of first use."""
        return list(dict.fromkeys(role for _, role in self.steps + self.rollback))

    @staticmethod
    def _resolve(steps: Iterable[StepRole], hosts: Mapping[str, str]) -> Plan:
        return [[step, hosts[role]] for step, role in steps]

    def plan(self, hosts: Mapping[str, str]) -> Plan:
        """Resolve roles to hosts: ``[[step, host], ...]``."""
        return self._resolve(self.steps, hosts)

    def recorded_rollback(self, hosts: Mapping[str, str]) -> dict:
        """The rollback as an operation records it at submit (``Operation.rollback``)."""
        return {"on": sorted(self.rollback_on), "plan": self._resolve(self.rollback, hosts)}

    def rollback_plan(self, failed_step: str, hosts: Mapping[str, str]) -> Plan:
        """The steps to run after ``failed_step`` failed (empty: the operation just fails)."""
        if failed_step not in self.rollback_on:
            return []
        return self._resolve(self.rollback, hosts)
