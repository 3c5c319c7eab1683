"""A local S3 endpoint for Tansu's ``s3://`` storage: moto's server (the
``moto[server]`` package, in the ``test`` extra) on a free loopback port,
started as a process and stopped by PID.

With it a Tansu broker keeps its topics, records and committed offsets
across a restart -- a broker roll, crash included -- which the default
``memory://`` storage loses::

    with S3Server(tmp_path / "s3") as s3:
        storage = s3.create_bucket("tansu")
        with run_tansu(binary, log, port, storage=storage, env=s3.tansu_env): ...
        with run_tansu(binary, log, port, storage=storage, env=s3.tansu_env): ...  # same data

(Tansu 0.6 discards SCRAM users on every storage engine, this one too:
docs/security.md, "Tansu".) Blocking helpers for fixtures, outside any Trio
run.
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path
from typing import Self

from ._servers import find_executable, free_port, stop_process, wait_for_port

__all__ = ["S3Server"]


class S3Server:
    """One moto S3 server on a loopback port; its log goes to *directory*.

    Attributes:
        port: The HTTP port.
        endpoint: ``http://127.0.0.1:<port>``.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = directory / "s3.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def tansu_env(self) -> dict[str, str]:
        """Environment variables that point Tansu's object store here
        (throwaway credentials: moto accepts any)."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> None:
        """Start the server; return once it accepts connections (bounded)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        moto = find_executable("moto_server", '"moto[server]"')
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(
                [moto, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for_port(self._proc, self.port, self.log)

    def create_bucket(self, name: str) -> str:
        """Create bucket *name*; return Tansu's ``--storage-engine`` URL
        for it (``s3://<name>/``)."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        return f"s3://{name}/"

    def stop(self) -> None:
        """Stop the server by PID (its data is gone with it)."""
        if self._proc is not None:
            stop_process(self._proc)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
