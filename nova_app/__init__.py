"""Nova's compute service, simulated: the reference application of the orchestrator.

Built only on the public API (``orchestrator.Orchestrator``): its Celery app and orchestrator
(:mod:`nova_app.app`), its flows (:mod:`nova_app.flows`), its steps and what they change on
instances and migrations (:mod:`nova_app.steps`, :mod:`nova_app.effects`), the simulated
hypervisor and network service, its tables (:mod:`nova_app.models`, with their migrations),
its operations API and command-line verbs, and the demo. Importing this package does nothing.
"""
