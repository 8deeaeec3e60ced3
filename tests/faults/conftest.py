"""The fault suite: fixtures, and one summary line per scenario at the end of the run.

Every scenario records a :class:`support.faults.Counts` (whether it passes or not) and
asserts its own counts are 0; the summary printed after the test run shows them all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.faults import Counts, OperatorProcesses, counting, operator_processes

_RESULTS: list[Counts] = []


@pytest.fixture
def counts(request: pytest.FixtureRequest) -> Iterator[Counts]:
    """This scenario's figures (:func:`support.faults.counting`), kept for the summary."""
    with counting(request) as result:
        _RESULTS.append(result)
        yield result


@pytest.fixture(scope="session")
def operators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcesses]:
    """Forks real operator processes (``spawn``/``kill``/``terminate`` by pid)."""
    with operator_processes(tmp_path_factory.mktemp("operators")) as processes:
        yield processes


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection summary")
    for result in _RESULTS:
        write(result.line())
        if terminalreporter.verbosity > 0:  # -v: what each scenario did
            for detail in result.details:
                write(f"    {detail}")
    total = Counts(
        scenario="TOTAL",
        faults=sum(r.faults for r in _RESULTS),
        lost=sum(r.lost for r in _RESULTS),
        expired=sum(r.expired for r in _RESULTS),
        spent_twice=sum(r.spent_twice for r in _RESULTS),
        leaked=sum(r.leaked for r in _RESULTS),
        seconds=sum(r.seconds for r in _RESULTS),
    )
    write(total.line())
