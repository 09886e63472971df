"""The orchestrator's app with one more worker bootstep whose stop never returns.

It stands for whatever can wedge Celery's own shutdown once the drain has ended (a pool join
waiting for a job whose process died, a silent broker): the exit deadline must still end the
process (workers.deadline).
"""

import threading

from celery import bootsteps

from nova_app.app import app


class WedgedStop(bootsteps.StartStopStep):
    label = "WedgedStop"
    requires = ("celery.worker.components:Pool",)

    def stop(self, worker) -> None:
        wedged_stop_waits_forever()

    terminate = stop  # a cold shutdown (the drain's deadline) wedges the same way


def wedged_stop_waits_forever() -> None:
    threading.Event().wait()


app.steps["worker"].add(WedgedStop)
