"""A simulated network service: plugs an instance's VIFs and says so with an external event.

Nova's build waits for ``network-vif-plugged`` from Neutron, delivered to the building host
through ``external_instance_event``. Events go to ``<host>-alt``, so a build caught by SIGTERM
still gets its event and finishes; route the event to ``main`` and the same build times out.

- ``ORCHESTRATOR_NETWORK_DELAY``: seconds before the event is sent (default 0.2);
- ``ORCHESTRATOR_VIF_PLUGGING_TIMEOUT``: seconds a build waits for it (default 300, as Nova).
"""

from __future__ import annotations

import os
import time

from nova_app import operations

VIF_PLUGGED = "network-vif-plugged"


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def plug_vifs(instance_ref: str, asked_at: float) -> None:
    """Plug the instance's VIFs; the network service answers with ``network-vif-plugged``
    ``ORCHESTRATOR_NETWORK_DELAY`` seconds after ``asked_at`` (the build's start).

    It answers from inside the build step, before the step ends. An earlier version sent it
    from a thread of the pool process that outlived the step: a pool process killed or
    stopped in that window lost the event for good (the build then waited out
    ``vif_plugging_timeout``), and a pool process exiting with that thread mid-publish could
    keep the worker's shutdown waiting. Sent from the step, an event not yet sent is sent again
    when the broker delivers the unacknowledged build again; an error fails the step the
    usual way (retried, then failed)."""
    time.sleep(max(0.0, asked_at + _seconds("ORCHESTRATOR_NETWORK_DELAY", 0.2) - time.time()))
    operations.external_event(instance_ref, VIF_PLUGGED)


def vif_timeout() -> float:
    """How long a build waits for its VIFs (Nova's ``vif_plugging_timeout``)."""
    return _seconds("ORCHESTRATOR_VIF_PLUGGING_TIMEOUT", 300)
