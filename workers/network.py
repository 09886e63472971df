"""A simulated network service: plugs an instance's VIFs and says so with an external event.

Nova's build waits for ``network-vif-plugged`` from Neutron, delivered to the building host
through ``external_instance_event``. Events go to ``<host>-alt``, so a build caught by SIGTERM
still gets its event and finishes; route the event to ``main`` and the same build times out.

- ``ORCHESTRATOR_NETWORK_DELAY``: seconds before the event is sent (default 0.2);
- ``ORCHESTRATOR_VIF_PLUGGING_TIMEOUT``: seconds a build waits for it (default 300, as Nova).
"""

from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger(__name__)
VIF_PLUGGED = "network-vif-plugged"


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def plug_vifs(instance_ref: str) -> threading.Thread:
    """Ask the network service to plug the instance's VIFs; it answers with an event."""
    delay = _seconds("ORCHESTRATOR_NETWORK_DELAY", 0.2)

    def deliver() -> None:
        time.sleep(delay)
        from orchestrator import operations

        try:
            operations.external_event(instance_ref, VIF_PLUGGED)
        except Exception as exc:  # the build times out and says so
            logger.error("network: could not send %s for %s: %s", VIF_PLUGGED, instance_ref, exc)

    thread = threading.Thread(target=deliver, name=f"network-{instance_ref}", daemon=True)
    thread.start()
    return thread


def vif_timeout() -> float:
    """How long a build waits for its VIFs (Nova's ``vif_plugging_timeout``)."""
    return _seconds("ORCHESTRATOR_VIF_PLUGGING_TIMEOUT", 300)
