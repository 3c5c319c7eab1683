"""Keeping secrets out of what trio_bus shows: URLs, reprs, logs, errors.

The transports and the ``trio-bus`` command share these helpers:

* :func:`redact_url` for every URL that goes into a message, a log record,
  an exception or a health report: the userinfo password (or a NATS
  token) and query parameters named like a secret become ``***``;
* :func:`url_secrets` for the secrets a URL carries;
* :func:`redact_text` for free text that may hold such URLs or known
  secret strings (client library error messages);
* :func:`secret_field` for the fields of options classes that hold a
  secret: attrs shows ``'***'`` in ``repr()`` instead of the value;
* :class:`SecretFilter`, a :class:`logging.Filter` that scrubs known
  secrets and URL userinfo from records (message, arguments, traceback).

Why a field helper and not a ``Secret`` wrapper type: the options classes
take plain ``str`` today and nats-py and aiokafka need plain ``str``; a
wrapper would change the public API, force an unwrap at every use, and
still leak through anything that unwraps it. The real defence is never
formatting a secret in the first place; ``repr=`` covers the one place
attrs would do it for us, and :class:`SecretFilter` is the safety net.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Iterable

import attrs

__all__ = [
    "warn_if_unverified",
    "REDACTED",
    "SecretFilter",
    "is_secret_name",
    "redact_text",
    "redact_url",
    "redacted_repr",
    "secret_field",
    "url_secrets",
]

#: What a secret is replaced with.
REDACTED = "***"

#: Names of query parameters (and options) that hold a secret.
_SECRET_NAME = re.compile(r"pass(word|wd)?|pwd|token|secret|credential|api_?key|private_?key", re.I)

#: A URL with userinfo inside free text: scheme, then the userinfo up to '@'.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@?#'\"]+)@")

#: Secrets shorter than this are not scrubbed from free text: replacing
#: every "a" in a log line would hide everything and protect nothing.
MIN_SCRUBBED_LENGTH = 3


def is_secret_name(name: str) -> bool:
    """Whether a parameter or field called *name* holds a secret
    (``password``, ``sasl_plain_password``, ``token``, ``client_secret``...)."""
    return _SECRET_NAME.search(name) is not None


def _redact_userinfo(userinfo: str) -> str:
    # "user:password" keeps the user; a lone part is a NATS token.
    user, sep, _ = userinfo.partition(":")
    return f"{user}:{REDACTED}" if sep else REDACTED


def _redact_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, sep, value = item.partition("=")
        parts.append(f"{name}={REDACTED}" if sep and value and is_secret_name(name) else item)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """*url* with its secrets replaced by ``***``, the rest unchanged.

    Every host of a multi-host URL is handled; text that is not a URL is
    returned as it is::

        >>> redact_url("nats://svc:s3cret@h1:4222,tok@h2:4222")
        'nats://svc:***@h1:4222,***@h2:4222'
        >>> redact_url("kafka://h:9092?sasl_plain_password=x&linger_ms=5")
        'kafka://h:9092?sasl_plain_password=***&linger_ms=5'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, hash_sep, fragment = rest.partition("#")
    rest, query_sep, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    hosts = []
    for host in netloc.split(","):
        userinfo, at, hostport = host.rpartition("@")
        hosts.append(f"{_redact_userinfo(userinfo)}@{hostport}" if at else host)
    redacted = f"{scheme}://{','.join(hosts)}{slash}{path}"
    if query_sep:
        redacted += "?" + _redact_query(query)
    return redacted + (hash_sep + fragment)


def url_secrets(url: str) -> list[str]:
    """The secrets :func:`redact_url` would hide in *url* (userinfo
    passwords and tokens, secret query values), e.g. to give them to a
    :class:`SecretFilter` or :func:`redact_text`."""
    _, sep, rest = url.partition("://")
    if not sep:
        return []
    rest, _, query = rest.partition("#")[0].partition("?")
    found = []
    for host in rest.partition("/")[0].split(","):
        userinfo, at, _ = host.rpartition("@")
        if at:
            user, colon, password = userinfo.partition(":")
            found.append(password if colon else user)
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if value and is_secret_name(name):
            found.append(value)
    return [secret for secret in found if secret]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """*text* with the userinfo of every URL in it redacted and every
    string of *secrets* (shorter than three characters excepted) replaced
    by ``***``; for client library messages that quote a URL or a value.

    ::

        >>> redact_text("cannot connect to nats://svc:pw1@h:4222", ["pw1"])
        'cannot connect to nats://svc:***@h:4222'
    """
    text = _URL_USERINFO.sub(lambda m: m["scheme"] + _redact_userinfo(m["userinfo"]) + "@", text)
    # Longest first, so that a secret containing another is replaced whole.
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_SCRUBBED_LENGTH:
            text = text.replace(secret, REDACTED)
    return text


def redacted_repr(value: object) -> str:
    """The attrs ``repr=`` of a secret field: ``None`` when unset (so that
    a reader sees whether one is configured), ``'***'`` otherwise."""
    return "None" if value is None else repr(REDACTED)


def secret_field(*, default: str | None = None) -> str | None:
    """An attrs field holding a secret (password, token): ``repr()`` shows
    ``'***'``; comparison, hashing and the value itself are unchanged::

        @attrs.frozen(kw_only=True)
        class ConnectOptions:
            user: str | None = None
            password: str | None = secret_field()
    """
    value: str | None = attrs.field(default=default, repr=redacted_repr)
    return value


class SecretFilter(logging.Filter):
    """A logging filter that scrubs secrets from every record it sees.

    It formats the record's message with its arguments, redacts URL
    userinfo and the known *secrets* in it and in the formatted traceback,
    and stores the result (``msg``, ``args=()``, ``exc_text``); the record
    is never dropped. Attach it to a **handler**: a logger's own filters
    see only records logged on that very logger, not those propagated
    from its children (``trio_bus.transports.nats`` ...)::

        handler = logging.StreamHandler()
        handler.addFilter(SecretFilter([os.environ["NATS_PASSWORD"]]))
        logging.getLogger().addHandler(handler)

    Args:
        secrets: Strings to scrub (more with :meth:`add`).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: set[str] = set(secrets)
        self._formatter = logging.Formatter()

    def add(self, *secrets: str) -> None:
        """Scrub *secrets* too from now on."""
        self.secrets.update(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub *record* in place; always keep it."""
        record.msg = redact_text(record.getMessage(), self.secrets)
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.secrets)
        return True


_warned_unverified: set[str] = set()


def warn_if_unverified(context: ssl.SSLContext | None, where: str) -> None:
    """Log once per *where* at WARNING when *context* does not verify the
    broker's certificate or host name: turning verification off must be
    explicit and visible (it is on with ``ssl.create_default_context()``)."""
    if context is None or where in _warned_unverified:
        return
    if context.verify_mode == ssl.CERT_NONE or not context.check_hostname:
        _warned_unverified.add(where)
        logging.getLogger("trio_bus.security").warning(
            "TLS to %s does not verify the broker's %s",
            where,
            "certificate" if context.verify_mode == ssl.CERT_NONE else "host name",
        )
