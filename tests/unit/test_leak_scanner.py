"""The leak detector itself: it must catch what it claims to catch."""

import logging
import textwrap
from pathlib import Path

from support import leaks

pytest_plugins = ["pytester"]


def test_finds_registered_values_raw_and_base64_and_the_naming_convention():
    leaks.register("hunter2-registered")
    assert leaks.find("token was hunter2-registered") == ["a registered secret (18 chars)"]
    assert leaks.find("aHVudGVyMi1yZWdpc3RlcmVk")  # base64 of it
    assert leaks.find("x test-secret-abc y") == ["a test-secret value (15 chars)"]
    assert leaks.find("nothing to see") == []


def test_a_secret_in_any_log_record_fails_the_test_that_logged_it(pytester):
    tests_dir = Path(__file__).resolve().parents[1]
    pytester.makeconftest(
        textwrap.dedent(f"""
            import logging, sys
            import pytest
            sys.path.insert(0, {str(tests_dir)!r})
            from support import leaks
            WATCH = leaks.LeakWatch()

            def pytest_configure(config):
                logging.getLogger().addHandler(WATCH)
                logging.getLogger().setLevel(logging.DEBUG)

            @pytest.fixture(autouse=True)
            def _scan():
                WATCH.take()
                yield
                problems = leaks.scan_records(WATCH.take())
                if problems:
                    pytest.fail("secret leaked: " + "; ".join(problems))
        """)
    )
    pytester.makepyfile(
        "import logging\n"
        "def test_leaky():\n    logging.getLogger('x').debug('password=test-secret-oops')\n"
        "def test_clean():\n    logging.getLogger('x').debug('password=[redacted]')\n"
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)  # test_leaky passes its call, fails teardown
    result.stdout.fnmatch_lines(["*secret leaked: log record of 'x' contains a test-secret value*"])
    assert "test-secret-oops" not in "\n".join(line for line in result.stdout.lines if "secret leaked" in line)


def test_watch_keeps_records_until_taken():
    watch = leaks.LeakWatch()
    logger = logging.getLogger("tokensync.test.leakwatch")
    logger.addHandler(watch)
    try:
        logger.warning("abc %s", "def")
        assert watch.take() == [("tokensync.test.leakwatch", "abc def")]
        assert watch.take() == []
    finally:
        logger.removeHandler(watch)
