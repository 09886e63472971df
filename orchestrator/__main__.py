"""``python -m orchestrator``: the ``orchestrator`` command line, where the console script is
not on PATH (a venv not activated, ``pipx run``, a container's plain Python)."""

from orchestrator.ops.cli import main

if __name__ == "__main__":
    main()
