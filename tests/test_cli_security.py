"""``trio-bus check`` with TLS and credentials, against real servers: exit
status 0 with the right settings, non-zero with wrong ones, and no secret
in what it prints."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trio_bus.__main__ import main
from trio_bus.testing import NatsServer, TestCA, TLSFiles, TLSTerminator, free_port, run_tansu

USER, PASSWORD, TOKEN = "svc", "pw-Cli-77ab10", "tok-Cli-2d4e6f"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_files(pki: TestCA) -> TLSFiles:
    return pki.issue("server")


@pytest.fixture(scope="module")
def secure_server(
    trio_bus_nats_server: NatsServer,  # the plugin's check that nats-server is installed
    tmp_path_factory: pytest.TempPathFactory,
    server_files: TLSFiles,
) -> Iterator[NatsServer]:
    store = tmp_path_factory.mktemp("nats-cli")
    with NatsServer(store, tls=server_files, user=USER, password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_token_server(
    trio_bus_nats_server: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
    server_files: TLSFiles,
) -> Iterator[NatsServer]:
    store = tmp_path_factory.mktemp("nats-cli-mtls")
    with NatsServer(store, tls=server_files, verify_clients=True, token=TOKEN) as server:
        yield server


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run ``trio-bus check`` in-process; exit status and all output."""
    status = main(["check", *argv, "--timeout", "5"])
    out = capsys.readouterr()
    return status, out.out + out.err


def test_help_explains_the_security_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for text in [
        "--tls-ca FILE",
        "--tls-cert FILE",
        "--insecure",
        "--password-env VAR",
        "--password-file FILE",
        "--token-env VAR",
        "--security-protocol {PLAINTEXT,SSL,SASL_PLAINTEXT,SASL_SSL}",
        "--sasl-mechanism {PLAIN,SCRAM-SHA-256,SCRAM-SHA-512}",
        "process list",
        "verified against the system's CAs",
    ]:
        assert text in out, text


def test_right_settings_exit_0(
    capsys: pytest.CaptureFixture[str],
    secure_server: NatsServer,
    pki: TestCA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NATS_PASSWORD", PASSWORD)
    status, out = check(
        capsys, secure_server.url, "--tls-ca", str(pki.ca_file), "--user", USER,
        "--password-env", "NATS_PASSWORD",
    )  # fmt: skip
    assert status == 0, out
    assert "HEALTHY" in out


def test_password_file_and_url_credentials(
    capsys: pytest.CaptureFixture[str], secure_server: NatsServer, pki: TestCA, tmp_path: Path
) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(PASSWORD + "\n")
    args = ["--tls-ca", str(pki.ca_file), "--user", USER, "--password-file", str(secret_file)]
    assert check(capsys, secure_server.url, *args)[0] == 0
    url = f"nats://{USER}:{PASSWORD}@127.0.0.1:{secure_server.port}"
    status, out = check(capsys, url, "--tls-ca", str(pki.ca_file))
    assert status == 0, out


def test_mutual_tls_and_token(
    capsys: pytest.CaptureFixture[str],
    mtls_token_server: NatsServer,
    pki: TestCA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = pki.issue("cli-client")
    monkeypatch.setenv("NATS_TOKEN", TOKEN)
    tls = [
        "--tls-ca",
        str(pki.ca_file),
        "--tls-cert",
        str(client.cert),
        "--tls-key",
        str(client.key),
    ]
    status, out = check(capsys, mtls_token_server.url, *tls, "--token-env", "NATS_TOKEN")
    assert status == 0, out
    status, out = check(capsys, mtls_token_server.url, "--tls-ca", str(pki.ca_file))
    assert status == 2, out  # no client certificate, no token


def test_insecure_skips_verification_with_one_warning(
    capsys: pytest.CaptureFixture[str], secure_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_bus.check")
    status, out = check(
        capsys, secure_server.url, "--insecure", "--user", USER, "--password", PASSWORD
    )
    assert status == 0, out
    warnings = [r for r in caplog.records if "NOT verified" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


@pytest.mark.parametrize(
    "wrong",
    [
        ["--user", USER, "--password", "wr0ng-pw"],
        [],  # no credentials
        ["--password", "wr0ng-pw"],  # password without a user
    ],
    ids=["wrong password", "no credentials", "no user"],
)
def test_wrong_credentials_exit_2_without_the_secret(
    capsys: pytest.CaptureFixture[str], secure_server: NatsServer, pki: TestCA, wrong: list[str]
) -> None:
    status, out = check(capsys, secure_server.url, "--tls-ca", str(pki.ca_file), *wrong)
    assert status == 2, out
    assert "wr0ng-pw" not in out
    url = f"nats://{USER}:wr0ng-pw@127.0.0.1:{secure_server.port}"
    status, out = check(capsys, url, "--tls-ca", str(pki.ca_file))
    assert status == 2, out
    assert "wr0ng-pw" not in out
    assert f"nats://{USER}:***@127.0.0.1:{secure_server.port}" in out


def test_untrusted_server_exits_2_within_the_timeout(
    capsys: pytest.CaptureFixture[str], secure_server: NatsServer
) -> None:
    # Without --tls-ca only the system's CAs are trusted: not the test CA.
    status, out = check(capsys, secure_server.url, "--user", USER, "--password", PASSWORD)
    assert status == 2, out
    assert PASSWORD not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nats://h:4222", "--tls-key", "k.pem"], "--tls-key needs --tls-cert"),
        (["nats://h:4222", "--tls-ca", "/nonexistent/ca.pem"], "TLS files (/nonexistent/ca.pem)"),
        (["nats://h:4222", "--password-env", "TRIO_BUS_UNSET_VAR"], "TRIO_BUS_UNSET_VAR"),
        (["nats://h:4222", "--password-file", "/nonexistent/pw"], "cannot read the password"),
        (["nats://h:4222", "--security-protocol", "SSL"], "Kafka option"),
        (["kafka://h:9092", "--token", "t"], "NATS options"),
        (["kafka://h:9092", "--security-protocol", "SASL_SSL"], "needs --sasl-user"),
        (["kafka://h:9092", "--insecure", "--security-protocol", "PLAINTEXT"], "need"),
        (["memory://", "--user", "u"], "apply to nats:// and kafka://"),
    ],
)
def test_inconsistent_options_exit_2_before_connecting(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out = check(capsys, *argv)
    assert status == 2
    assert message in out


async def _check_process(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``python -m trio_bus check`` as a process (our own trio loop keeps
    serving the brokers meanwhile), with *env* added to its environment."""
    done = await trio.run_process(
        [sys.executable, "-m", "trio_bus", "check", *argv, "--timeout", "10"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=os.environ | (env or {}),
    )
    return done.returncode, (done.stdout + done.stderr).decode()


async def test_kafka_tls(tansu_binary_path: str, tmp_path: Path, pki: TestCA) -> None:
    broker_port, tls_port = free_port(), free_port()
    files = pki.issue("kafka-cli")
    terminator = TLSTerminator(files, "127.0.0.1", broker_port, listen_port=tls_port)
    with run_tansu(tansu_binary_path, tmp_path / "tansu.log", broker_port, tls_port):
        async with trio.open_nursery() as nursery:
            await nursery.start(terminator.run)
            url = f"kafka://127.0.0.1:{tls_port}"
            status, out = await _check_process(url, "--tls-ca", str(pki.ca_file))
            assert status == 0, out  # --tls-ca implies security_protocol SSL
            status, out = await _check_process(url)
            assert status == 2, out
            nursery.cancel_scope.cancel()


async def test_kafka_wrong_scram_credentials(tansu_binary_path: str, tmp_path: Path) -> None:
    with run_tansu(tansu_binary_path, tmp_path / "tansu.log", authentication=True) as broker:
        status, out = await _check_process(
            f"kafka://{broker.bootstrap}", "--sasl-mechanism", "SCRAM-SHA-512",
            "--sasl-user", USER, "--sasl-password-env", "TRIO_BUS_TEST_PW",
            env={"TRIO_BUS_TEST_PW": PASSWORD},
        )  # fmt: skip
    assert status == 2, out
    assert "authentication failed" in out
