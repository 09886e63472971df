"""Message signing (Celery's ``auth`` serializer), on real workers: only key holders schedule.

Keys and certificates are made here with ``cryptography``. The API side runs as the real CLI in
a subprocess, since signing is switched on at import from the environment.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from nova_app import operations, views
from nova_app.app import app
from orchestrator.broker import queue_depth
from orchestrator.config import ConfigError
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.signing import CERT_VAR, KEY_VAR, STORE_VAR, Signing
from tests.helpers import ended, wait_op

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Identity:
    key: Path
    cert: Path
    store: Path  # a directory of trusted certificates

    def env(self, store: Path | None = None) -> dict[str, str]:
        return {KEY_VAR: str(self.key), CERT_VAR: str(self.cert),
                STORE_VAR: str(store or self.store)}


def make_identity(directory: Path, name: str) -> Identity:
    """An RSA key and a self-signed certificate; its store trusts only that certificate."""
    directory.mkdir(parents=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path, store = directory / "key.pem", directory / "cert.pem", directory / "store"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    key_path.chmod(0o600)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    store.mkdir()
    (store / f"{name}.pem").write_bytes(pem)
    return Identity(key_path, cert_path, store)


def cli(env: dict[str, str], *args: str) -> dict:
    """The orchestrator CLI of this checkout, in its own process (signing is set at import)."""
    proc = subprocess.run(
        [sys.executable, "-c", "from orchestrator.ops.cli import main; main()", *args, "--json"],
        cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_signed_steps_run_and_unsigned_ones_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    trusted = make_identity(tmp_path / "trusted", "orchestrator")
    intruder = make_identity(tmp_path / "intruder", "intruder")
    signed = trusted.env()
    compute1 = fleet.start("compute1", env=signed)
    fleet.start("compute2", env=signed)
    assert f"message signing on (certificate {trusted.cert}" in compute1.log()

    # A key holder boots: the step is signed, verified, run.
    booted = cli(signed, "boot", "vm1", "--host", "compute1")["operation"]
    assert wait_op(booted, ended)["status"] == "completed"

    # Plain JSON (this process does not sign) is refused and never run.
    unsigned = operations.boot("vm2", "compute1")
    # Signed, but by a key whose certificate the hosts do not trust.
    forged = cli(intruder.env(), "boot", "vm3", "--host", "compute1")["operation"]
    wait_for(lambda: "Refusing to deserialize untrusted content of type json"
             in compute1.log() and "Unknown certificate" in compute1.log(), 20,
             "the unsigned and the forged step to be refused")
    for op_id in (unsigned.id, forged):
        data = views.operation_dict(op_id)
        assert (data["status"], data["steps"]) == ("queued", []), data
    assert queue_depth(app, "compute1") == 0, "refused, not requeued"

    # The hosts keep working, and the steps they publish to each other are signed too:
    # prep_resize (sent by the CLI), resize_instance (by compute2), finish_resize (compute1).
    resize = cli(signed, "resize", "vm1", "--flavor", "m1.large", "--to", "compute2")
    assert wait_op(resize["operation"], ended)["status"] == "completed"
    assert views.show_instance("vm1")["host"] == "compute2"

    # Remote control is signed as well: a key holder's drain reaches the host.
    reply = cli(signed, "drain", "compute1")
    assert "compute1 draining" in json.dumps(reply)
    assert compute1.wait(timeout=30) == 0, compute1.log()[-3000:]


def test_half_configured_signing_is_an_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (KEY_VAR, CERT_VAR, STORE_VAR):
        monkeypatch.delenv(name, raising=False)
    assert Signing.from_env() is None
    trusted = make_identity(tmp_path / "trusted", "orchestrator")
    monkeypatch.setenv(KEY_VAR, str(trusted.key))
    with pytest.raises(ConfigError, match=f"not set: {CERT_VAR}, {STORE_VAR}"):
        Signing.from_env()
    monkeypatch.setenv(CERT_VAR, str(trusted.cert))
    monkeypatch.setenv(STORE_VAR, str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no certificate there"):
        Signing.from_env()
    monkeypatch.setenv(STORE_VAR, str(trusted.store))
    assert Signing.from_env() == Signing(trusted.key, trusted.cert, str(trusted.store))


def test_worker_with_half_configured_signing_refuses_to_start(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "orchestrator", "worker", "-Q", "compute1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, KEY_VAR: str(tmp_path / "key.pem"), CERT_VAR: "", STORE_VAR: ""},
    )
    assert proc.returncode == 2
    assert f"error: message signing needs {KEY_VAR}" in proc.stderr
