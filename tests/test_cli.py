"""`tern qmp SOCKET COMMAND [ARGS-JSON]`: a one-shot QMP client."""

from __future__ import annotations

import json
import subprocess

from tern_harness import STEP, TERN_BINARY

RUNNING = {"status": "running", "running": True, "singlestep": False}


def tern_qmp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TERN_BINARY, "qmp", *args], capture_output=True, text=True, timeout=STEP * 2)


def test_cli_query_status(tern):
    done = tern_qmp(tern.sock, "query-status")
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == RUNNING, done


def test_cli_with_arguments(tern):
    done = tern_qmp(tern.sock, "human-monitor-command", '{"command-line": "info status"}')
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == "VM status: running\r\n", done


def test_cli_stop_then_status(tern):
    done = tern_qmp(tern.sock, "stop")
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == {}, done
    done = tern_qmp(tern.sock, "query-status")
    assert json.loads(done.stdout)["status"] == "paused", done
    assert tern_qmp(tern.sock, "cont").returncode == 0


def test_cli_pmemsave(tern):
    target = tern.workdir / "cli-dump"
    args = json.dumps({"val": 0x100020, "size": 8, "filename": str(target)})
    done = tern_qmp(tern.sock, "pmemsave", args)
    assert done.returncode == 0, done
    assert target.read_bytes() == b"TERNGST1"


def test_cli_unknown_command_fails(tern):
    done = tern_qmp(tern.sock, "no-such-command")
    assert done.returncode != 0, done
    assert "The command no-such-command has not been found" in done.stdout + done.stderr, done


def test_cli_command_error_fails(tern):
    done = tern_qmp(tern.sock, "pmemsave", '{"val": 0, "size": 1}')
    assert done.returncode != 0, done
    assert "Parameter 'filename' is missing" in done.stdout + done.stderr, done
    done = tern_qmp(tern.sock, "closefd", '{"fdname": "x"}')
    assert done.returncode != 0, done
    assert "File descriptor named 'x' not found" in done.stdout + done.stderr, done


def test_cli_bad_arguments_json_fails(tern):
    done = tern_qmp(tern.sock, "query-status", "{not json")
    assert done.returncode != 0, done
    tern.assert_alive()


def test_cli_missing_socket_fails(tmp_path):
    done = tern_qmp(str(tmp_path / "no-such.sock"), "query-status")
    assert done.returncode != 0, done
    assert done.stderr.strip(), "a failure should say why on stderr"


def test_cli_quit(tern):
    tern.expect_exit = True
    done = tern_qmp(tern.sock, "quit")
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == {}, done
    assert tern.proc.wait(STEP) == 0
