"""Secure NATS connections against real nats-server processes: TLS with a
throwaway CA (trustme), mutual TLS, users with passwords, tokens; wrong
settings fail at open, fast, with a typed error and without the secret
(docs/security.md, "What a failure looks like").
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trio_bus.errors import AuthenticationError, TransportUnavailableError
from trio_bus.testing import NatsServer, TestCA, TLSFiles
from trio_bus.transports.nats import ConnectOptions, NatsOptions

from ._security import (
    assert_no_secret,
    exception_texts,
    log_texts,
    open_fails,
    round_trip,
)

USER, PASSWORD, TOKEN = "svc", "pw-Nats-5f1c2e", "tok-Nats-9a7b3d"


def options(
    tls: ssl.SSLContext | None = None,
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    tls_hostname: str | None = None,
) -> NatsOptions:
    connect = ConnectOptions(
        tls=tls, user=user, password=password, token=token, tls_hostname=tls_hostname
    )
    return NatsOptions(connect=connect)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_files(pki: TestCA) -> TLSFiles:
    return pki.issue("server", "127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def secure_server(
    trio_bus_nats_server: NatsServer,  # the plugin's check that nats-server is installed
    tmp_path_factory: pytest.TempPathFactory,
    server_files: TLSFiles,
) -> Iterator[NatsServer]:
    """TLS plus a user with a password."""
    store = tmp_path_factory.mktemp("nats-tls")
    with NatsServer(store, tls=server_files, user=USER, password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(
    trio_bus_nats_server: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
    server_files: TLSFiles,
) -> Iterator[NatsServer]:
    """Mutual TLS: clients need a certificate from the test CA."""
    store = tmp_path_factory.mktemp("nats-mtls")
    with NatsServer(store, tls=server_files, verify_clients=True) as server:
        yield server


@pytest.fixture(scope="module")
def token_server(
    trio_bus_nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats-token"), token=TOKEN) as server:
        yield server


def with_userinfo(server: NatsServer, userinfo: str) -> str:
    return f"nats://{userinfo}@127.0.0.1:{server.port}"


# --------------------------------------------------------------- works


async def test_tls_and_password_round_trip(secure_server: NatsServer, pki: TestCA) -> None:
    await round_trip(secure_server.url, options(pki.client_context(), user=USER, password=PASSWORD))


async def test_credentials_in_the_url_round_trip(secure_server: NatsServer, pki: TestCA) -> None:
    url = with_userinfo(secure_server, f"{USER}:{PASSWORD}")
    await round_trip(url, options(pki.client_context()))


async def test_tls_hostname_names_the_certificate(secure_server: NatsServer, pki: TestCA) -> None:
    tls = pki.client_context()
    await round_trip(
        secure_server.url, options(tls, tls_hostname="localhost", user=USER, password=PASSWORD)
    )


async def test_mutual_tls_with_a_client_certificate(mtls_server: NatsServer, pki: TestCA) -> None:
    await round_trip(mtls_server.url, options(pki.client_context(pki.issue("client"))))


@pytest.mark.parametrize("in_url", [False, True], ids=["options", "url"])
async def test_token_round_trip(token_server: NatsServer, in_url: bool) -> None:
    if in_url:
        await round_trip(with_userinfo(token_server, TOKEN), None)
    else:
        await round_trip(token_server.url, options(token=TOKEN))


async def test_no_secret_in_logs_metrics_or_health(
    secure_server: NatsServer, pki: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every library's records
    opts = options(pki.client_context(), user=USER, password=PASSWORD)
    shown = await round_trip(secure_server.url, opts)
    shown += await round_trip(with_userinfo(secure_server, f"{USER}:{PASSWORD}"), opts)
    assert_no_secret([PASSWORD], [*log_texts(caplog), *shown])


def test_options_repr_hides_the_secrets() -> None:
    assert_no_secret([PASSWORD, TOKEN], [repr(options(password=PASSWORD, token=TOKEN))])


# --------------------------------------------------------------- refused


def _refusal_cases(
    secure_server: NatsServer, token_server: NatsServer, mtls_server: NatsServer, pki: TestCA
) -> dict[str, tuple[str, NatsOptions, str]]:
    """case -> (url, options, mechanism AuthenticationError should name)."""
    tls = pki.client_context()
    wrong_url = with_userinfo(secure_server, f"{USER}:wr0ng-pw")
    return {
        "wrong password": (
            secure_server.url, options(tls, user=USER, password="wr0ng-pw"), "user/password"
        ),
        "password in url": (wrong_url, options(tls), "user/password"),
        "no credentials": (secure_server.url, options(tls), "no credentials"),
        "wrong token": (token_server.url, options(token="wr0ng-token"), "token"),
        "no client cert": (mtls_server.url, options(tls), "TLS client certificate"),
    }  # fmt: skip


REFUSALS = ["wrong password", "password in url", "no credentials", "wrong token", "no client cert"]


@pytest.fixture
def refusal(
    request: pytest.FixtureRequest,
    secure_server: NatsServer,
    token_server: NatsServer,
    mtls_server: NatsServer,
    pki: TestCA,
) -> tuple[str, NatsOptions, str]:
    case: str = request.param
    return _refusal_cases(secure_server, token_server, mtls_server, pki)[case]


@pytest.mark.parametrize("refusal", REFUSALS, indirect=True)
async def test_refused_credentials_fail_fast(refusal: tuple[str, NatsOptions, str]) -> None:
    url, opts, _ = refusal
    exc = await open_fails(url, opts)  # within FAIL_FAST: no endless reconnects
    assert isinstance(exc, TransportUnavailableError), repr(exc)


#: Seen once on 2026-12-02 in a clean-clone run on a loaded machine (passes
#: alone): with TLS 1.3 the client's handshake ends before the server checks
#: its certificate, and a server that closes at once may reset the
#: connection before the client reads the alert, so the client sees only a
#: reset: an unavailable server, not a refusal.
ALERT_LOST = "the server's certificate-required alert was lost in a reset (under load)"


@pytest.mark.parametrize("refusal", REFUSALS, indirect=True)
async def test_refused_credentials_are_an_authentication_error_without_the_secret(
    refusal: tuple[str, NatsOptions, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url, opts, mechanism = refusal
    exc = await open_fails(url, opts)
    assert_no_secret(["wr0ng-pw", "wr0ng-token"], [*exception_texts(exc), *log_texts(caplog)])
    if mechanism == "TLS client certificate" and not isinstance(exc, AuthenticationError):
        assert isinstance(exc, TransportUnavailableError), repr(exc)
        pytest.xfail(ALERT_LOST)
    assert isinstance(exc, AuthenticationError), repr(exc)
    assert exc.mechanism == mechanism


@pytest.mark.parametrize("case", ["untrusted CA", "wrong hostname", "system CAs only"])
async def test_unverifiable_server_certificate_fails_at_open(
    secure_server: NatsServer, pki: TestCA, tmp_path: Path, case: str
) -> None:
    tls = {
        "untrusted CA": TestCA(tmp_path / "other").client_context(),
        "wrong hostname": pki.client_context(),
        "system CAs only": None,  # nats-py's default context
    }[case]
    hostname = "not-the-server.example" if case == "wrong hostname" else None
    opts = options(tls, user=USER, password=PASSWORD, tls_hostname=hostname)
    exc = await open_fails(secure_server.url, opts)
    assert isinstance(exc, AuthenticationError), repr(exc)
    assert exc.mechanism == "TLS"
    assert_no_secret([PASSWORD], exception_texts(exc))


async def test_tls_is_required_when_configured(nats_bus_url: str, pki: TestCA) -> None:
    # The session server speaks no TLS: a client that asked for TLS must not
    # go on in plaintext.
    exc = await open_fails(nats_bus_url, options(pki.client_context()))
    assert isinstance(exc, AuthenticationError), repr(exc)


# ------------------------------------------------------ the test servers


@pytest.mark.parametrize(
    "security",
    [
        {"user": "u"},
        {"password": "p"},
        {"user": "u", "password": "p", "token": "t"},
        {"verify_clients": True},
    ],
)
def test_nats_server_refuses_inconsistent_security(
    tmp_path: Path, security: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        NatsServer(tmp_path, **security)


def test_testing_imports_without_trustme(tmp_path: Path) -> None:
    # trustme is imported only when a CA is made; blocked here, as if absent.
    code = (
        "import sys; sys.modules['trustme'] = None\n"
        "import trio_bus.testing as t\n"
        "try:\n"
        f"    t.TestCA(__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'TestCA needs trustme: pip install "trio-bus[test]"' in done.stdout
