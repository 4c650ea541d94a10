"""pytest fixtures for the QMP tests: a tern process per test, always cleaned up."""

from __future__ import annotations

import shutil
import signal

import pytest

from tern_harness import BOOT_TIMEOUT, Tern, new_workdir, skip_reason

#: No single test may take longer than this (the suite has no pytest-timeout plugin).
TEST_TIME_LIMIT = 45


def pytest_report_header(config):
    reason = skip_reason()
    return [f"tern QMP tests: {reason}" if reason else "tern QMP tests: /dev/kvm and the tern binary found"]


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    if reason:
        marker = pytest.mark.skip(reason=reason)
        for item in items:
            item.add_marker(marker)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reason = skip_reason()
    if reason:
        terminalreporter.write_sep("!", reason, red=True, bold=True)


@pytest.fixture(autouse=True)
def time_limit():
    """Fail a test that runs too long (SIGALRM interrupts whatever it waits on)."""
    def expired(signum, frame):
        raise TimeoutError(f"test exceeded its {TEST_TIME_LIMIT} s limit")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def start_tern():
    """A factory: start_tern(smp=, name=, paused=, append=, qmp=[specs], extra=[], wait_guest=, probe=)

    Starts tern, waits (wait_guest=True) until the guest has printed its first pass line, and
    (probe=True, the default) until every QMP address answers with a greeting. Every tern
    started is stopped afterwards: SIGTERM, then SIGKILL. A tern that died on its own during
    the test (and was not expected to) makes the test error in teardown.
    """
    started: list[Tern] = []

    def start(*, wait_guest=False, probe=True, **options) -> Tern:
        vm = Tern(workdir=new_workdir(), **options)
        started.append(vm)
        if wait_guest:
            vm.wait_passes(1, timeout=BOOT_TIMEOUT)
        if probe:
            vm.wait_for_qmp()
        return vm

    yield start

    problems = []
    for vm in started:
        died = vm.proc.poll()
        if died is not None and not vm.expect_exit:
            problems.append(f"tern exited on its own with status {died} during the test" + vm.diagnostics())
        status = vm.terminate()
        if status is None:
            problems.append(f"tern pid {vm.pid} survived SIGKILL")
        # Diagnostics are in the failure messages; the directory may hold large pmemsave dumps.
        shutil.rmtree(vm.workdir, ignore_errors=True)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def tern(start_tern) -> Tern:
    """tern with the built-in guest started (not waited for), QMP ready on a unix socket."""
    return start_tern()


@pytest.fixture
def booted_tern(start_tern) -> Tern:
    """tern whose guest has printed its first pass line (working set filled and checked)."""
    return start_tern(wait_guest=True)


@pytest.fixture
def tern_paused(start_tern) -> Tern:
    """tern started with -S: status prelaunch, guest not started."""
    return start_tern(paused=True)
