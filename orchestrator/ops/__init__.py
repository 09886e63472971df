"""What an operator uses: the command line (:mod:`.cli`), the fleet's views (:mod:`.views`),
the live terminal view (:mod:`.live`), Prometheus metrics (:mod:`.metrics`), Flower's Hosts
and Operations pages (:mod:`.flower`, ``templates/``) and the deploy check (:mod:`.deploy`).

They read what the engine records (the ledger, the service registry, the broker's queues)
and change nothing the engine decides; the engine (``orchestrator``'s other modules,
``workers``) imports none of them, which tests/test_layout.py checks. Importing this package
imports none of its modules.
"""
