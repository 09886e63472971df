"""Optional message signing: only holders of the key can schedule steps on a host.

Off by default. Setting ``ORCHESTRATOR_SIGNING_KEY``, ``ORCHESTRATOR_SIGNING_CERT`` and
``ORCHESTRATOR_SIGNING_CERT_STORE`` (all three, in every process: API/CLI, workers, Flower)
switches the app to Celery's ``auth`` serializer: every task and remote-control message is
signed with the key (RSA, PEM) and carries the certificate's id; a receiver accepts it only if
the signature verifies against a certificate in its store (a directory or a glob of PEM files).
A plain JSON (unsigned) step, or one signed by a key whose certificate is not in the store, is
refused by the worker with one logged line and never run.

What is signed is the message body (the step's kwargs: operation, position, host). Celery's
protocol-2 headers, the task name among them, are not; a key holder's signed body replayed under
another step's name is refused by the plan check (``StepMismatch``), and a replayed step is a
duplicate (steps are idempotent). Task events stay JSON (Flower reads them) and carry no
credentials.

Verified against celery 5.7 (``celery/security``): ``setup_security`` changes kombu's
process-wide serializer registry, so it runs once, at import of :mod:`orchestrator.app`.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from orchestrator.config import ConfigError

KEY_VAR = "ORCHESTRATOR_SIGNING_KEY"
CERT_VAR = "ORCHESTRATOR_SIGNING_CERT"
STORE_VAR = "ORCHESTRATOR_SIGNING_CERT_STORE"
#: Optional: the passphrase of an encrypted key.
KEY_PASSWORD_VAR = "ORCHESTRATOR_SIGNING_KEY_PASSWORD"
VARIABLES = (KEY_VAR, CERT_VAR, STORE_VAR)


@dataclass(frozen=True)
class Signing:
    key: Path
    cert: Path
    cert_store: str
    key_password: str | None = None

    @classmethod
    def from_env(cls) -> Signing | None:
        """The signing settings, None when signing is off; ConfigError when half set."""
        values = {name: os.environ.get(name) or "" for name in VARIABLES}
        if not any(values.values()):
            return None
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise ConfigError(
                f"message signing needs {', '.join(VARIABLES)}; not set: {', '.join(missing)}"
            )
        for name in (KEY_VAR, CERT_VAR):
            if not Path(values[name]).is_file():
                raise ConfigError(f"{name}={values[name]}: no such file")
        store = values[STORE_VAR]
        pattern = os.path.join(store, "*") if os.path.isdir(store) else store
        if not glob.glob(pattern):
            raise ConfigError(f"{STORE_VAR}={store}: no certificate there")
        return cls(
            key=Path(values[KEY_VAR]), cert=Path(values[CERT_VAR]), cert_store=store,
            key_password=os.environ.get(KEY_PASSWORD_VAR) or None,
        )

    def describe(self) -> str:
        return f"on (certificate {self.cert}, trusted store {self.cert_store})"


def enable(app: Celery, signing: Signing) -> None:
    """Sign what this process sends and accept only signed task and control messages."""
    from celery.exceptions import ImproperlyConfigured, SecurityError

    app.conf.update(
        security_key=str(signing.key),
        security_certificate=str(signing.cert),
        security_cert_store=signing.cert_store,
        security_key_password=signing.key_password,
        security_digest="sha256",
        # Tasks and remote control (Celery's mailbox uses these two) are signed and verified.
        task_serializer="auth",
        accept_content=["auth"],
        # Events stay JSON so Flower can read them; they never start a step.
        event_serializer="json",
    )
    try:
        # allowed_serializers: content types still decodable where a consumer's own accept
        # list allows them (event receivers); task and control consumers accept only 'auth'.
        app.setup_security(allowed_serializers=["json"])
    except (ImproperlyConfigured, SecurityError, OSError, ValueError) as exc:
        raise ConfigError(f"message signing ({', '.join(VARIABLES)}): {exc}") from None
