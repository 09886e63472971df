"""A plain Celery app (no drain, no routing): the baseline our workers are compared with."""

import os

from celery import Celery

app = Celery("plain", broker=os.environ["ORCHESTRATOR_BROKER_URL"])
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, accept_content=["json"])
