"""Worker bootstep: what makes a worker's log say what happened, once.

- Each pool process writes every thread's stack to the log on ``SIGUSR2``
  (:func:`workers.deadline.dump_stacks_on_signal`): the exit deadline sends it to a pool
  process that keeps the worker from exiting, so the log says where it was stuck. Connected to
  Celery's ``worker_process_init`` here, in the worker's main process before the pool forks.
- A step message rejected as malformed is logged once, by :func:`orchestrator.stepcall.reject`:
  Celery's second line about the same ``Reject``, with a traceback, is dropped.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps, signals

from orchestrator.stepcall import quiet_repeated_rejections
from workers.deadline import dump_stacks_on_signal


def _pool_process_stacks(**kwargs: Any) -> None:
    dump_stacks_on_signal()


class Diagnostics(bootsteps.Step):
    label = "Diagnostics"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        quiet_repeated_rejections()
        signals.worker_process_init.connect(
            _pool_process_stacks, weak=False, dispatch_uid="orchestrator.pool-stacks")
