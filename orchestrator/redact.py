"""What the project shows of values it did not make: URLs without their secrets, and text
from outside without control characters.

Every URL the project prints, logs, broadcasts or renders (the broker's, the result
backend's, the ledger's) goes through :func:`redact_url`; every error message that may quote
one (a driver's, kombu's, SQLAlchemy's) through :func:`redact_text`; every value from outside
that is logged (a drain reason, a task id, a host name, a routing file name) through
:func:`printable`, so a newline in it cannot write a line of its own into a log.

What is masked:

- the password of ``user:password@`` (the user name stays, when it is a plain name);
- the value of every query or ``key=value`` parameter whose name says it is a secret
  (:func:`secret_param`: password, passwd, pwd, pass, sslpassword, ssl_password,
  ssl_key_password, token, secret, access_key, api_key, credential(s), passphrase, private
  key, sig/signature, auth/authorization, ...);
- each URL of kombu's ``;``-separated fail-over list (Sentinel's included) on its own.

A password is often written without percent-encoding, and one holding ``@``, ``/``, ``?``
or ``#`` is ambiguous to a URL parser (``urllib`` and kombu end the host part at the first
``/?#``; SQLAlchemy ends the password at the first ``@``). The rule here does not guess in
the parser's favour: the credentials are everything between ``://`` and the LAST ``@`` that
is followed by a plausible host part (``host[:port]``, an IPv6 literal, a libpq
``host1:1,host2:2`` list, or nothing) and then ``/``, ``?``, ``#`` or the end, and preceded by
something that can be credentials (``user:...`` or a plain user name). So an ``@`` in a query
after a ``user:password@host`` masks the URL up to it, and a URL where no ``@`` qualifies but
a ``:`` precedes one is shown as ``scheme://***``. A URL starting ``scheme:///`` (a SQLite
file, a socket) has no credentials, only parameters.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

from orchestrator.config import configured_urls
from orchestrator.errors import ConfigError

__all__ = ["MASK", "check_passwords", "error_text", "failover_urls", "password_of", "printable",
           "redact_text", "redact_url", "secret_param"]

MASK = "***"

#: Parameter names (lower case, without ``_``/``-``/``.``) that are secrets whatever else
#: they say; and fragments that make any name holding them one (``ssl_key_password``,
#: ``aws_secret_access_key``, ``client_secret``, ``access_token``, ``passfile``...).
_SECRET_NAMES = frozenset({"key", "sig", "signature", "auth", "authorization", "pass"})
_SECRET_PARTS = ("password", "passwd", "pwd", "passphrase", "pass", "secret", "token",
                 "accesskey", "apikey", "privatekey", "sessionkey", "credential", "signature")

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
#: kombu splits a broker URL at ``;`` into fail-over URLs (``kombu.Connection``); only a
#: ``;`` that starts another URL separates two (a password or a query may hold one too).
_FAILOVER = re.compile(r";(?=" + _SCHEME + ")")
_URL_IN_TEXT = re.compile(_SCHEME + r"[^\s'\"<>()\[\]{}]*")
#: A host part: empty, a name or address, or ``[IPv6]``, each with an optional port, several
#: separated by ``,`` (libpq), then the end of the host part.
_HOST = r"(?:\[[0-9A-Za-z:.%]*\]|[\w.~%-]*)(?::\d*)?"
_HOSTS = re.compile(rf"{_HOST}(?:,{_HOST})*(?=[/?#]|$)")
#: A user name shown as it is (else it is masked too: it may be part of the password).
_PLAIN_USER = re.compile(r"[\w.~%!$'*+,@-]*")
#: ``name=value`` in free text or a libpq connection string (``password='a b'``).
_KEY_VALUE = re.compile(
    r"(?<![\w.-])([\w.-]+)(\s*=\s*)('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;,]*)")


def secret_param(name: str) -> bool:
    """Whether a query or connection parameter named ``name`` holds a secret."""
    key = re.sub(r"[-_.\s]", "", unquote_plus(name).lower())
    return key in _SECRET_NAMES or any(part in key for part in _SECRET_PARTS)


def _found(found: list[str], secret: str) -> None:
    """Add ``secret`` to ``found``: as written, decoded, and the pieces of it that a parser
    ending it early (at an '@' for SQLAlchemy, at '/?#' for urllib and kombu) takes for a host
    or a path, which its errors then quote."""
    found.extend({secret, unquote_plus(secret), unquote(secret)})
    found.extend(piece for piece in re.split(r"[@/?#:]", secret) if len(piece) > 2)


def _params(query: str, found: list[str]) -> str:
    """``query`` (``a=1&b=2`` or ``;``-separated) with each secret parameter's value masked;
    the values masked are added to ``found``."""
    pieces = re.split(r"([&;])", query)
    for i in range(0, len(pieces), 2):
        name, eq, value = pieces[i].partition("=")
        if eq and value and secret_param(name):
            _found(found, value)
            pieces[i] = f"{name}={MASK}"
    return "".join(pieces)


def _credentials_end(rest: str) -> tuple[int | None, list[int]]:
    """Where the credentials of ``rest`` (a URL after ``scheme://``) end: the index of their
    '@' (None: no credentials), and every '@' of ``rest`` that could be it.

    An '@' ends credentials if a host part follows it and what precedes it can be
    credentials: a password after a ':', or a plain user name ('/db?app=x@y' is neither).
    A URL starting '///' (a file, a socket) has no host part, hence no credentials."""
    ats = [] if rest.startswith("/") else [i for i, c in enumerate(rest) if c == "@"]
    for at in reversed(ats):
        if _HOSTS.match(rest, at + 1) and (":" in rest[:at] or _PLAIN_USER.fullmatch(rest[:at])):
            return at, ats
    return None, ats


def password_of(url: str) -> str | None:
    """The password of one URL as written (not decoded), by the rule above; None if it has
    none, or if no '@' tells where it would end."""
    scheme, sep, rest = url.partition("://")
    at = _credentials_end(rest)[0] if sep else None
    if at is None or ":" not in rest[:at]:
        return None
    return rest[:at].partition(":")[2]


def _one(url: str, found: list[str]) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return _key_values(url, found)
    at, ats = _credentials_end(rest)
    creds, tail = (rest[:at], rest[at + 1:]) if at is not None else (None, rest)
    if at is None and ats and ":" in rest[:ats[-1]]:  # no telling where a password would end
        _found(found, rest[:ats[-1]])
        return f"{scheme}://{MASK}"
    shown = ""
    if creds is not None:
        user, colon, password = creds.partition(":")
        if not _PLAIN_USER.fullmatch(user):
            _found(found, creds)
            shown = f"{MASK}@"
        elif colon:
            _found(found, password)
            shown = f"{user}:{MASK}@"
        else:
            shown = f"{user}@"
    try:  # with the credentials off, the rest parses without ambiguity
        parts = urlsplit(f"x://{tail}")
    except ValueError:  # an unbalanced '[': not a URL we can say anything of
        _found(found, rest)
        return f"{scheme}://{MASK}"
    netloc = parts.netloc
    if creds is None and not _HOSTS.fullmatch(netloc):  # ':password' with no '@' at all
        _found(found, netloc)
        netloc = MASK
    query = f"?{_params(parts.query, found)}" if "?" in tail.partition("#")[0] else ""
    fragment = f"#{_params(parts.fragment, found)}" if "#" in tail else ""
    return f"{scheme}://{shown}{netloc}{parts.path}{query}{fragment}"


def _key_values(text: str, found: list[str]) -> str:
    def mask(m: re.Match[str]) -> str:
        if not secret_param(m.group(1)) or not m.group(3):
            return m.group(0)
        found.append(m.group(3).strip("'\""))
        return f"{m.group(1)}{m.group(2)}{MASK}"

    return _KEY_VALUE.sub(mask, text)


def failover_urls(url: Any) -> list[str]:
    """The URLs of a broker URL: kombu's ``;``-separated fail-over list, or Celery's list."""
    if url is None:
        return []
    if isinstance(url, list | tuple):
        return [part for u in url for part in failover_urls(u)]
    return _FAILOVER.split(str(url))


def _redact(url: Any, found: list[str]) -> str:
    return ";".join(_one(part, found) for part in failover_urls(url))


def redact_url(url: Any) -> str:
    """``url`` (a broker, result backend or database URL, a ``;``-separated or a list of
    fail-over URLs, or a libpq ``key=value`` string) with its secrets masked."""
    return _redact(url, [])


def redact_text(text: Any, *urls: Any) -> str:
    """``text`` (an error message, a log argument) with the secrets of ``urls`` (the URLs it
    may quote, whole or in part: a driver's error may quote the password alone), of every
    URL it holds, and of every ``password=...``-like parameter masked."""
    text = str(text)
    secrets: list[str] = []
    for url in urls:
        if url:
            for whole in (url if isinstance(url, list | tuple) else [url]):
                text = text.replace(str(whole), _redact(whole, secrets))
    text = _URL_IN_TEXT.sub(lambda m: _redact(m.group(0), secrets), text)
    text = _key_values(text, secrets)
    for secret in sorted({s for s in secrets if s and s != MASK}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    return _ESCAPES.get(char) or (
        f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
        else f"\\U{code:08x}")


def printable(value: Any) -> str:
    """``value`` as text for one log line: control characters (newline, carriage return,
    escape, and every other character that ``str.isprintable`` refuses: Unicode line
    separators, bidirectional overrides) written as Python escapes, so that a value from
    outside cannot start a line of its own or rewrite the terminal showing it."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def error_text(exc: Any, kind: bool = False) -> str:
    """What an exception (of a driver, kombu, a step: or its text) says, for one log line:
    the secrets of the configured broker and database URLs (``ORCHESTRATOR_BROKER_URL``,
    ``ORCHESTRATOR_DB_URL``) and of any URL it quotes masked, control characters escaped;
    prefixed by its class's name with ``kind``."""
    text = f"{type(exc).__name__}: {exc}" if kind and isinstance(exc, BaseException) else exc
    return printable(redact_text(text, *configured_urls()))


#: What a parser ends a password at, were it written as it is: kombu reads a broker URL with
#: ``urllib.parse``, whose host part ends at the first '/', '?' or '#' (it would connect
#: elsewhere, and its ValueError quotes the start of the password); SQLAlchemy's URL pattern
#: ends the password at the first '@' and takes the rest for the host.
_ENDS_PASSWORD = {"broker": "/?#", "ledger": "@"}
_PERCENT = {"/": "%2F", "?": "%3F", "#": "%23", "@": "%40"}


def check_passwords(broker_url: Any, ledger_url: str) -> None:
    """Refuse, in one line naming the URL (redacted), a password that the library reading
    the URL would end early; the user is told which characters to percent-encode."""
    for what, urls in (("broker", failover_urls(broker_url)), ("ledger", [ledger_url])):
        for url in urls:
            bad = sorted(set(password_of(url) or "") & set(_ENDS_PASSWORD[what]))
            if bad:
                raise ConfigError(
                    f"{what} URL {redact_url(url)}: its password holds "
                    f"{' and '.join(repr(c) for c in bad)} as it is, where "
                    f"{'kombu' if what == 'broker' else 'SQLAlchemy'} would end it: write "
                    f"{' and '.join(_PERCENT[c] for c in bad)} instead")
