"""The demo: a destination host gets SIGTERM in the middle of a resize and drains.

1. start compute1 and compute2 (real ``celery worker`` processes) and Flower;
2. boot vm1 on compute1, then resize it to compute2;
3. while resize_instance runs on compute1, SIGTERM compute2;
4. a new boot sent to compute2 during its drain is not run: it waits in queue ``compute2``;
5. finish_resize still runs on compute2 (via ``compute2-alt``), which then exits 0 by itself;
6. compute2 restarts and the waiting boot runs.

On a terminal the fleet is drawn live (:mod:`orchestrator.ops.live`); otherwise each event is a
plain line.
"""

from __future__ import annotations

import signal
import time

from nova_app import operations, views
from nova_app.app import app, orch
from orchestrator import Watch, queue_depth, timeline_lines, wait_for
from orchestrator.local import FLOWER_PORT, local_stack


def run_demo(step_delay: float = 3.0, flower: bool = True, flower_port: int = FLOWER_PORT,
             live: bool | None = None) -> int:
    env = {"ORCHESTRATOR_STEP_DELAY": "0.3",
           "ORCHESTRATOR_STEP_DELAYS": f"resize_instance={step_delay}"}
    with local_stack(orch, app="nova_app.app", flower=flower, flower_port=flower_port,
                     env=env) as stack:
        watch = Watch(orch, title="orchestrator demo: compute2 drains in the middle of a resize",
                      subtitle=f"Flower: {stack.flower_url}" if stack.flower_url else None)
        if live is not None:
            watch.live = live
        with watch:
            return _story(stack, watch.say, step_delay)


def _story(stack, say, step_delay: float) -> int:
    if stack.embedded_broker:
        say(f"no ORCHESTRATOR_BROKER_URL: started an embedded Redis at {stack.broker_url}")
    if stack.flower_url:
        say(f"Flower: {stack.flower_url} (Hosts tab: {stack.flower_url}hosts, Operations tab: "
            f"{stack.flower_url}operations)")
    say("starting workers compute1 and compute2 (queues <host> and <host>-alt)")
    stack.fleet.start("compute1", graceful_timeout=60)
    compute2 = stack.fleet.start("compute2", graceful_timeout=60)

    boot = operations.boot("vm1", "compute1")
    views.wait_operation(boot.id)
    say("vm1 booted on compute1; resizing it to m1.large on compute2")
    resize = operations.resize("vm1", flavor="m1.large", dest="compute2")
    views.wait_operation(resize.id, lambda d: (d["current_step"] or {}).get("step")
                         == "resize_instance" and d["current_step"]["state"] == "running")
    say(f"resize_instance runs on compute1 for {step_delay:g}s: SIGTERM to compute2 "
        "(the destination)")
    signalled = time.monotonic()
    compute2.signal(signal.SIGTERM)
    wait_for(lambda: any(v.state == "draining" for v in orch.registry.services("compute2")),
             10, "compute2 to report draining")
    late = operations.boot("vm2", "compute2")
    say(f"compute2 is draining; a new request (boot vm2, {late.id[:8]}) is sent to it anyway")

    rc = compute2.wait(timeout=90)
    exited = time.monotonic()
    result = views.operation_dict(resize.id)
    say(f"compute2 exited with status {rc}, {exited - signalled:.1f}s after SIGTERM")
    for step in result["steps"]:
        say(f"   {step['step']:<18} on {step['host']}: {step['status']}")
    vm1 = views.show_instance("vm1")
    say(f"resize {result['status']}: vm1 is on {vm1['host']}, flavor {vm1['flavor']}, "
        f"{vm1['vm_state']}")
    say(f"boot vm2 not run: {views.operation_dict(late.id)['status']}, "
        f"{queue_depth(app, 'compute2')} message waiting in queue compute2")
    for line in compute2.log().splitlines():
        if "drain:" in line and "summary" in line:
            say("   compute2 log: " + line.split("] ", 1)[-1])

    say("restarting compute2")
    stack.fleet.start("compute2", graceful_timeout=60)
    vm2 = views.wait_operation(late.id)
    say(f"boot vm2 {vm2['status']} on compute2 after the restart")
    say(f"the resize's timeline (orchestrator operation {resize.id[:8]}):")
    for line in timeline_lines(orch, resize.id):
        say("   " + line)
    ok = rc == 0 and result["status"] == "completed" and vm2["status"] == "completed"
    say("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1
