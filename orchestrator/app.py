"""The Celery application: broker, no-loss settings, the step router and the drain bootstep.

routing.yaml is loaded here, at import, so a worker, the CLI or Flower with a broken routing
file refuses to start with the file, line and key instead of misrouting anything.
"""

from __future__ import annotations

import click
from celery import Celery, signals
from celery.utils.log import get_logger

from orchestrator import registry, signing
from orchestrator.broker import guard_redis_restore_on_lost_connection
from orchestrator.config import Settings, redact_url
from orchestrator.flows import STEP_NAMES
from orchestrator.routing import AltCapability, StepRouter, load_routing
from workers.drain import Drain
from workers.resend import StrandedSteps
from workers.waits import EventWaits

guard_redis_restore_on_lost_connection()

#: How long a crashed worker can block kombu's Redis restore sweep (see below).
UNACKED_MUTEX_EXPIRE_SECONDS = 10

settings = Settings.from_env()
routing_table = load_routing(settings.routing_file, STEP_NAMES)
# Alt steps go to <host>-alt only for hosts that consume it (ORCHESTRATOR_ALT_ROUTING=auto),
# judged from a registry snapshot at most ORCHESTRATOR_ALT_CACHE_SECONDS old.
step_router = StepRouter(
    routing_table,
    mode=settings.alt_routing,  # type: ignore[arg-type]
    capability=AltCapability(registry.alt_snapshot, settings.alt_cache_seconds),
    on_fallback=registry.count_fallback,
)

app = Celery("orchestrator", broker=settings.broker_url, include=["workers.steps"])
app.conf.update(
    # JSON only: a step message is data, never code.
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    # Operation state lives in the database; Celery results are not needed.
    task_ignore_result=True,
    # Nothing lost: a step's message is acknowledged only once the step has finished, a step
    # whose process died goes back to the queue, and each process holds at most one
    # unstarted message (fewer to hand back when the host drains).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # On a lost broker connection a running step cannot be acknowledged any more. RabbitMQ
    # requeues it at once, so stop it rather than run it twice side by side. Redis only gives
    # it back after the visibility timeout: let it finish (its effect is applied once and the
    # operation moves on); the late redelivery is then dropped as a duplicate.
    worker_cancel_long_running_tasks_on_connection_loss=not settings.broker_url.startswith(
        ("redis", "rediss")
    ),
    broker_transport_options={
        # Redis: an unacknowledged message (its worker was killed) comes back after this...
        "visibility_timeout": settings.visibility_timeout,
        # ...once kombu's sweep notices. Its default period is interval x throttle = 100 s;
        # sweep a few times per visibility timeout instead (a cheap sorted-set scan).
        "unacked_restore_interval": max(1.0, min(60.0, settings.visibility_timeout / 4)),
        "unacked_restore_throttle": 1,
        # Each sweep takes a mutex in Redis that expires after 300 s by default. A worker
        # SIGKILLed inside a sweep (frequent sweeps make that likelier) then stops every
        # worker from restoring anything for 5 minutes: the soak saw eight operations stuck
        # that way. A sweep restores at most ten messages in a few milliseconds; a
        # concurrent one is harmless (each restore is a WATCH transaction).
        "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_SECONDS,
        # RabbitMQ only: a publish returns once the broker has the message (persisted, for a
        # durable queue and a persistent message), else it raises; one round trip per step.
        "confirm_publish": True,
    },
    broker_connection_retry_on_startup=True,
    # RabbitMQ: persistent messages in durable queues (kombu's Queue default) survive a broker
    # restart. Classic queues by default; quorum queues with ORCHESTRATOR_QUEUE_TYPE=quorum
    # (see README, Brokers: delivery limit). Both apply to the default queue too.
    task_default_delivery_mode="persistent",
    task_create_missing_queue_type=settings.queue_type,
    task_default_queue_type=settings.queue_type,
    task_routes=(step_router,),
    # A step's queue is created on first use (<host>, <host>-alt): Celery declares it with
    # each publish (once per connection) and the worker at start, so a step sent to a host
    # whose worker never ran waits in the broker (RabbitMQ drops a message routed to no queue).
    # The default queue only ever sees non-step tasks.
    task_create_missing_queues=True,
    task_default_queue="orchestrator",
    worker_hijack_root_logger=True,
    # Refuses task messages that would stop or stall Celery's consumer (workers.validation).
    worker_consumer="workers.validation:GuardedConsumer",
)
signing_settings = signing.Signing.from_env()
if signing_settings is not None:
    signing.enable(app, signing_settings)
app.steps["worker"].add(Drain)
app.steps["worker"].add(EventWaits)
app.steps["worker"].add(StrandedSteps)
app.user_options["worker"].add(
    click.Option(
        ["--graceful-timeout"],
        type=float,
        default=None,
        help=(
            "Seconds a draining host keeps serving its alt queue after SIGTERM "
            "(default: ORCHESTRATOR_GRACEFUL_SHUTDOWN_TIMEOUT or 180)."
        ),
    )
)
app.user_options["worker"].add(
    click.Option(
        ["--service-version"],
        type=click.IntRange(min(registry.SERVICE_VERSIONS), max(registry.SERVICE_VERSIONS)),
        default=None,
        help=(
            f"Service version this worker registers (default {registry.SERVICE_VERSION}); "
            f"{registry.LEGACY_SERVICE_VERSION} is the legacy service of a rolling upgrade, "
            "which consumes only <host>."
        ),
    )
)


@signals.worker_process_init.connect
def _pool_process_stacks(**kwargs) -> None:
    from workers.deadline import dump_stacks_on_signal

    dump_stacks_on_signal()


@signals.celeryd_after_setup.connect
def _log_settings(sender: str, instance, conf, **kwargs) -> None:
    """One line at worker start: where it connects, passwords redacted."""
    get_logger("orchestrator").info(
        "orchestrator: broker %s, database %s, %s queues, message signing %s",
        redact_url(conf.broker_url or settings.broker_url), redact_url(settings.db_url),
        settings.queue_type,
        signing_settings.describe() if signing_settings is not None else "off",
    )
