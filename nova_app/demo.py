"""The demo: a destination host gets SIGTERM in the middle of a resize and drains.

1. start compute1 and compute2 (real ``celery worker`` processes);
2. boot vm1 on compute1, then resize it to compute2;
3. while resize_instance runs on compute1, SIGTERM compute2;
4. a new boot sent to compute2 during its drain is not run: it waits in queue ``compute2``;
5. finish_resize still runs on compute2 (via ``compute2-alt``), which then exits 0 by itself;
6. compute2 restarts and the waiting boot runs.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from nova_app import operations, views
from nova_app.app import app, orch
from orchestrator.broker import queue_depth
from orchestrator.embedded import embedded_redis
from orchestrator.fleet import Fleet, wait_for


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_demo(step_delay: float = 3.0) -> int:
    with ExitStack() as stack:
        broker = os.environ.get("ORCHESTRATOR_BROKER_URL")
        if not broker:
            broker = stack.enter_context(embedded_redis()).url
            _say(f"no ORCHESTRATOR_BROKER_URL: started an embedded Redis at {broker}")
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="orch-demo-")))
        env = {
            "ORCHESTRATOR_BROKER_URL": broker,
            "ORCHESTRATOR_DB_URL": f"sqlite:///{workdir / 'demo.db'}",
            "ORCHESTRATOR_STEP_DELAY": "0.3",
            "ORCHESTRATOR_STEP_DELAYS": f"resize_instance={step_delay}",
        }
        os.environ.update(env)
        app.conf.broker_url = broker
        fleet = Fleet(env=env, log_dir=workdir / "logs")
        stack.callback(fleet.stop_all)

        _say("starting workers compute1 and compute2 (queues <host> and <host>-alt)")
        fleet.start("compute1", graceful_timeout=60)
        compute2 = fleet.start("compute2", graceful_timeout=60)

        boot = operations.boot("vm1", "compute1")
        views.wait_operation(boot.id)
        _say("vm1 booted on compute1; resizing it to m1.large on compute2")
        resize = operations.resize("vm1", flavor="m1.large", dest="compute2")
        views.wait_operation(resize.id, lambda d: (d["current_step"] or {}).get("step")
                 == "resize_instance" and d["current_step"]["state"] == "running")
        _say("resize_instance is running on compute1: SIGTERM to compute2 (the destination)")
        signalled = time.monotonic()
        compute2.signal(signal.SIGTERM)
        wait_for(lambda: any(v.state == "draining" for v in orch.registry.services("compute2")),
                 10, "compute2 to report draining")
        late = operations.boot("vm2", "compute2")
        _say(f"compute2 is draining; a new request (boot vm2, {late.id}) is sent to it anyway")

        rc = compute2.wait(timeout=90)
        exited = time.monotonic()
        result = views.operation_dict(resize.id)
        _say(f"compute2 exited with status {rc}, {exited - signalled:.1f}s after SIGTERM")
        for step in result["steps"]:
            _say(f"   {step['step']:<18} on {step['host']}: {step['status']}")
        vm1 = views.show_instance("vm1")
        _say(f"resize {result['status']}: vm1 is on {vm1['host']}, flavor {vm1['flavor']}, "
             f"{vm1['vm_state']}")
        _say(f"boot vm2 not run: {views.operation_dict(late.id)['status']}, "
             f"{queue_depth(app, 'compute2')} message waiting in queue compute2")
        for line in compute2.log().splitlines():
            if "drain:" in line:
                _say("   compute2 log: " + line.split("] ", 1)[-1])

        _say("restarting compute2")
        fleet.start("compute2", graceful_timeout=60)
        vm2 = views.wait_operation(late.id)
        _say(f"boot vm2 {vm2['status']} on compute2 after the restart")
        ok = rc == 0 and result["status"] == "completed" and vm2["status"] == "completed"
        _say("demo " + ("succeeded" if ok else "FAILED"))
        return 0 if ok else 1
