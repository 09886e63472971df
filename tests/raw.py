"""Publish hand-made messages with kombu directly, as anyone with access to the broker could."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from nova_app.app import app

STEP = "compute.build_and_run_instance"


def publish_raw(
    queue: str, *, task: str = STEP, kwargs: Mapping[str, Any] | None = None,
    args: tuple = (), body: Any = None, content_type: str | None = None,
    content_encoding: str = "utf-8", serializer: str = "json",
    headers: Mapping[str, Any] | None = None, drop_headers: Iterable[str] = (),
) -> str:
    """Publish one task message to ``queue`` through the default exchange; returns its id.

    The headers are Celery's protocol-2 headers for ``task`` (then ``headers`` overrides and
    ``drop_headers`` removals); the body is ``[args, kwargs, options]`` serialized with
    ``serializer``, unless ``body`` (sent as given, with ``content_type``) replaces it.
    """
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, args=args, kwargs=dict(kwargs or {}))
    hdrs = {**message.headers, **(headers or {})}
    for name in drop_headers:
        hdrs.pop(name, None)
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        options: dict[str, Any] = dict(
            exchange="", routing_key=queue, headers=hdrs, delivery_mode=2,
            declare=[app.amqp.queues[queue]], retry=True, **message.properties,
        )
        if body is None:
            producer.publish(message.body, serializer=serializer, **options)
        else:
            producer.publish(body, content_type=content_type or "application/json",
                             content_encoding=content_encoding, **options)
    return task_id
