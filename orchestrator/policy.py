"""The Celery settings of "nothing lost", in one place: what an Orchestrator puts on its app,
and what the benchmark's plain Celery baseline uses so that both are measured with the same
guarantees.

:func:`no_loss` is what any Celery app that must not lose a task would set (acknowledge late,
give back what a dead process held, prefetch one, persistent messages, ride out a broker
fail-over); :func:`orchestrator_settings` adds what routing by host and the drain need.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config import Settings

#: Broker URL schemes of kombu's Redis transports (Sentinel's included).
REDIS_SCHEMES = ("redis", "rediss", "sentinel")
#: How long a crashed worker can block kombu's Redis restore sweep.
UNACKED_MUTEX_EXPIRE_SECONDS = 10


def publish_retry_policy(broker_url: Any) -> dict[str, Any]:
    """Celery's ``task_publish_retry_policy`` for ``broker_url``.

    A broker fail-over (Sentinel promotes the replica 2-3 s after the primary dies; a
    RabbitMQ client moves to the next node) takes seconds, and Celery's default retry gives
    up after 0.6 s. This rides it out: 8 rounds over about 6.5 s, each reconnect asking the
    sentinels for the primary anew. kombu counts a try per address of a ``;``-separated URL
    and sleeps only after a full round, hence the rounds times the addresses."""
    return {"max_retries": 8 * len(str(broker_url or "").split(";")), "interval_start": 0,
            "interval_step": 0.5, "interval_max": 1.0}


def no_loss(broker_url: str, settings: Settings,
            transport_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Celery settings under which no task message is lost, for ``broker_url``;
    ``transport_options``: the app's own, kept."""
    own = dict(transport_options or {})
    sentinel = str(broker_url).startswith("sentinel") and not own.get("master_name")
    return dict(
        broker_url=broker_url,
        # JSON only: a step message is data, never code.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Operation state lives in the ledger; Celery results are not needed.
        task_ignore_result=True,
        # Nothing lost: a message is acknowledged only once its task has finished, a task
        # whose process died goes back to the queue, and each process holds at most one
        # unstarted message (fewer to hand back when the host drains).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_publish_retry_policy=publish_retry_policy(broker_url),
        # On a lost broker connection a running task cannot be acknowledged any more.
        # RabbitMQ requeues it at once, so stop it rather than run it twice side by side.
        # Redis only gives it back after the visibility timeout: let it finish; the
        # redelivery is a duplicate (the ledger drops it).
        worker_cancel_long_running_tasks_on_connection_loss=not str(broker_url).startswith(
            REDIS_SCHEMES),
        broker_transport_options={
            **own,
            # Redis Sentinel (sentinel://h1:26379;sentinel://h2:26379): the primary's name,
            # from ORCHESTRATOR_SENTINEL_MASTER unless the app set its own.
            **({"master_name": settings.sentinel_master} if sentinel else {}),
            # Redis: an unacknowledged message (its worker was killed) comes back after this...
            "visibility_timeout": settings.visibility_timeout,
            # ...once kombu's sweep notices. Its default period is interval x throttle = 100 s;
            # sweep a few times per visibility timeout instead (a cheap scan).
            "unacked_restore_interval": max(1.0, min(60.0, settings.visibility_timeout / 4)),
            "unacked_restore_throttle": 1,
            # Each sweep takes a mutex that expires after 300 s by default: a worker SIGKILLed
            # inside a sweep would stop every restore for 5 minutes (the soak saw it). A sweep
            # takes milliseconds; a concurrent one is harmless.
            "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_SECONDS,
            # RabbitMQ: a publish returns once the broker has the message.
            "confirm_publish": True,
        },
        broker_connection_retry_on_startup=True,
        # RabbitMQ: persistent messages in durable queues survive a broker restart. Classic
        # queues by default; quorum with ORCHESTRATOR_QUEUE_TYPE=quorum.
        task_default_delivery_mode="persistent",
        task_create_missing_queue_type=settings.queue_type,
        task_default_queue_type=settings.queue_type,
        # A host's queues are created on first use (<host>, <host>-alt): a task sent to a
        # host whose worker never ran waits in the broker.
        task_create_missing_queues=True,
    )


def orchestrator_settings(broker_url: str, settings: Settings,
                          transport_options: dict[str, Any] | None,
                          routes: tuple[Any, ...]) -> dict[str, Any]:
    """:func:`no_loss`, plus routing by host (``routes``: the step router first) and the
    worker's own consumer."""
    return dict(
        no_loss(broker_url, settings, transport_options),
        task_routes=routes,
        # Refuses task messages that would stop or stall Celery's consumer.
        worker_consumer="workers.validation:GuardedConsumer",
        # RabbitMQ: the worker's remote-control queue is exclusive to its connection by
        # default (Celery 5.5+). A worker cut off from the broker reconnects before RabbitMQ
        # has noticed its old connection is gone (its heartbeat timeout), the redeclare fails
        # with RESOURCE_LOCKED and Celery ends the worker ("Unrecoverable error"; seen in
        # tests/test_partitions.py). Not exclusive, the queue is shared by the new connection
        # meanwhile and still auto-deleted once unused.
        control_queue_exclusive=False,
    )
