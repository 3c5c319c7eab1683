"""Secrets stay out of URLs shown, reprs, log records and error texts
(:mod:`trio_bus._secrets`), and :class:`~trio_bus.errors.AuthenticationError`
names the broker and mechanism only."""

from __future__ import annotations

import logging
import pickle
import ssl

import attrs
import pytest

from trio_bus._secrets import (
    REDACTED,
    SecretFilter,
    is_secret_name,
    redact_text,
    redact_url,
    secret_field,
    url_secrets,
    warn_if_unverified,
)
from trio_bus.errors import AuthenticationError, TransportUnavailableError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://svc:s3cret@h:4222", "nats://svc:***@h:4222"),
        ("nats://s3cret-token@h:4222", "nats://***@h:4222"),
        ("nats://a:p1@h1:4222,b:p2@h2:4222,h3:4222", "nats://a:***@h1:4222,b:***@h2:4222,h3:4222"),
        ("nats://svc:p@ss@h:4222", "nats://svc:***@h:4222"),  # '@' in the password
        ("nats://svc:@h:4222", "nats://svc:***@h:4222"),
        (
            "kafka://h:9092?sasl_plain_password=x&linger_ms=5&token=t&Client_Secret=c",
            "kafka://h:9092?sasl_plain_password=***&linger_ms=5&token=***&Client_Secret=***",
        ),
        ("kafka://h:9092?password=&x=1", "kafka://h:9092?password=&x=1"),  # nothing to hide
        ("kafka://h:9092/path?x=1#frag", "kafka://h:9092/path?x=1#frag"),
        ("memory://orders", "memory://orders"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_url_secrets_lists_what_redact_url_hides() -> None:
    url = "nats://a:p1@h1:4222,tok2@h2:4222,h3:4222?token=t3&linger_ms=5"
    assert url_secrets(url) == ["p1", "tok2", "t3"]
    assert url_secrets("kafka://h:9092") == []
    assert url_secrets("plain text") == []


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("sasl_plain_password", True),
        ("passwd", True),
        ("token", True),
        ("auth_token", True),
        ("client_secret", True),
        ("api_key", True),
        ("credentials", True),
        ("user", False),
        ("linger_ms", False),
        ("key", False),  # message keys are not secrets
    ],
)
def test_is_secret_name(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_redact_text_scrubs_urls_and_known_secrets() -> None:
    text = "cannot connect to nats://svc:pw-1@h:4222 (token tok-22 refused; 'pw-1')"
    assert redact_text(text, ["pw-1", "tok-22"]) == (
        "cannot connect to nats://svc:***@h:4222 (token *** refused; '***')"
    )


def test_redact_text_replaces_the_longest_secret_whole_and_skips_tiny_ones() -> None:
    assert redact_text("abcdef abc", ["abc", "abcdef"]) == "*** ***"
    # A one- or two-letter "secret" would blank the text and protect nothing.
    assert redact_text("a banana", ["a", "an"]) == "a banana"


@attrs.frozen(kw_only=True)
class _Options:
    user: str | None = None
    password: str | None = secret_field()


def test_secret_field_shows_whether_it_is_set_never_its_value() -> None:
    assert repr(_Options(user="svc", password="s3cret")) == "_Options(user='svc', password='***')"
    assert repr(_Options(user="svc")) == "_Options(user='svc', password=None)"
    # The value itself, equality and hashing are untouched.
    assert _Options(password="x").password == "x"
    assert _Options(password="x") == _Options(password="x") != _Options(password="y")
    assert hash(_Options(password="x")) == hash(_Options(password="x"))


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("trio_bus.x", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_secret_filter_scrubs_message_arguments_and_traceback() -> None:
    def refuse() -> None:
        raise RuntimeError("refused pw-123 for nats://svc:other-pw@h:4222")

    scrub = SecretFilter(["pw-123"])
    try:
        refuse()
    except RuntimeError as exc:
        record = _record("connect %s failed: %r", "nats://svc:pw-123@h:4222", exc, exc=exc)
    assert scrub.filter(record) is True
    formatted = logging.Formatter().format(record)
    assert "pw-123" not in formatted
    assert "other-pw" not in formatted
    assert "connect nats://svc:***@h:4222 failed" in formatted
    assert "RuntimeError" in formatted  # the traceback is kept, scrubbed


def test_secret_filter_on_a_handler_sees_child_loggers(caplog: pytest.LogCaptureFixture) -> None:
    scrub = SecretFilter()
    scrub.add("tok-456")
    caplog.handler.addFilter(scrub)
    try:
        with caplog.at_level(logging.DEBUG):
            logging.getLogger("trio_bus.transports.nats").warning("token %s refused", "tok-456")
    finally:
        caplog.handler.removeFilter(scrub)
    assert caplog.messages == [f"token {REDACTED} refused"]


def test_authentication_error_names_broker_and_mechanism() -> None:
    exc = AuthenticationError(
        "nats://svc:***@127.0.0.1:4222", "user/password", "Authorization Violation"
    )
    assert isinstance(exc, TransportUnavailableError)
    assert str(exc) == (
        "authentication with nats://svc:***@127.0.0.1:4222 failed (user/password): "
        "Authorization Violation"
    )
    assert (exc.broker, exc.mechanism, exc.detail) == (
        "nats://svc:***@127.0.0.1:4222",
        "user/password",
        "Authorization Violation",
    )
    assert str(AuthenticationError("h:9092", "TLS")) == "authentication with h:9092 failed (TLS)"
    copy = pickle.loads(pickle.dumps(exc))
    assert (type(copy), str(copy), copy.mechanism) == (type(exc), str(exc), exc.mechanism)


def test_an_unverified_tls_context_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    context = ssl.create_default_context()
    warn_if_unverified(context, "verified:1")
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with caplog.at_level(logging.WARNING, logger="trio_bus.security"):
        warn_if_unverified(context, "broker:9093")
        warn_if_unverified(context, "broker:9093")
    warnings = [r for r in caplog.records if r.name == "trio_bus.security"]
    assert len(warnings) == 1
    assert "broker:9093" in warnings[0].getMessage()
