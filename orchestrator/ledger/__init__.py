"""The ledger: where every operation, its steps and the fleet's hosts are recorded.

``store`` holds the transitions (:class:`~orchestrator.ledger.store.Ledger`), ``statements``
the hot statements built once per dialect, ``driver`` runs them straight on the database
driver, ``engines`` holds a process's engines and sessions
(:class:`~orchestrator.ledger.engines.Database`), ``schema`` and ``migrations`` the tables'
versions, ``models`` the tables, ``health`` whether the database answered lately. Nothing
here imports the rest of the engine but its leaves (configuration, errors, redaction, flows,
seams: tests/test_layout.py says which); importing this package loads none of its modules.
"""
