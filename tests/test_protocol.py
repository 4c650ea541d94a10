"""The QMP wire protocol, spoken over plain sockets: greeting, negotiation, ids, input errors."""

from __future__ import annotations

import json
import time

import pytest

from tern_harness import RawQMP, assert_error, raw_session

RUNNING = {"status": "running", "running": True, "singlestep": False}


def check_usable(client: RawQMP) -> None:
    """After an error the same connection still answers a good command."""
    reply = client.command("query-status", id="still-usable")
    assert reply.get("id") == "still-usable" and reply.get("return", {}).get("status") in ("running", "prelaunch"), \
        f"connection not usable after an error: {reply}"


def test_greeting_format(tern):
    with RawQMP(tern.address) as client:
        line = client.read_line()
        assert line.endswith(b"\r\n"), f"QMP lines end with CRLF like QEMU's: {line!r}"
        greeting = json.loads(line)
    assert set(greeting) == {"QMP"}, greeting
    qmp = greeting["QMP"]
    assert qmp.get("capabilities") == [], greeting
    version = qmp.get("version")
    assert isinstance(version, dict), greeting
    assert version.get("qemu") == {"major": 4, "minor": 2, "micro": 0}, greeting
    assert isinstance(version.get("package"), str), greeting


def test_replies_are_single_crlf_lines(tern):
    with raw_session(tern.address) as client:
        client.send({"execute": "query-status"})
        line = client.read_line()
        assert line.endswith(b"\r\n") and b"\n" not in line[:-1], line
        assert json.loads(line) == {"return": RUNNING}


def test_command_before_negotiation_is_refused(tern):
    with RawQMP(tern.address) as client:
        client.greeting()
        for command in ("query-status", "stop", "quit", "no-such-command"):
            reply = client.command(command)
            assert_error(reply, "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        # Nothing was executed: the guest is still running, and negotiation still works.
        assert client.command("qmp_capabilities") == {"return": {}}
        assert client.command("query-status") == {"return": RUNNING}
    tern.assert_alive()


def test_negotiation_with_empty_arguments(tern):
    with RawQMP(tern.address) as client:
        client.greeting()
        assert client.command("qmp_capabilities", {}, id=1) == {"return": {}, "id": 1}
        assert client.command("query-status")["return"] == RUNNING


def test_second_capabilities_is_refused(tern):
    with raw_session(tern.address) as client:
        reply = client.command("qmp_capabilities")
        assert_error(reply, "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        check_usable(client)


ID_VALUES = [
    "abc",
    "",
    "héllo ✓",
    'quote " backslash \\ newline \n tab \t end',
    0,
    42,
    -7,
    3.5,
    True,
    False,
    [1, "two", {"three": 3}],
    {"nested": {"list": [1, 2, {"deep": None}]}, "n": 1},
    [],
    {},
]


@pytest.mark.parametrize("value", ID_VALUES, ids=[json.dumps(v)[:20] for v in ID_VALUES])
def test_id_echoed_on_return(tern, value):
    with raw_session(tern.address) as client:
        client.send({"execute": "query-status", "id": value})
        line = client.read_line()
        assert line.endswith(b"\r\n") and b"\n" not in line[:-1], f"reply must be one line: {line!r}"
        reply = json.loads(line)
        assert reply == {"return": RUNNING, "id": value}


def test_id_null_echoed(tern):
    # QEMU echoes any "id" member it was given, JSON null included.
    with raw_session(tern.address) as client:
        assert client.command("query-status", id=None) == {"return": RUNNING, "id": None}


def test_id_large_integer_echoed_exactly(tern):
    big = 2**53 + 1  # not representable as a double
    with raw_session(tern.address) as client:
        assert client.command("query-status", id=big) == {"return": RUNNING, "id": big}


def test_no_id_means_no_id_in_reply(tern):
    with raw_session(tern.address) as client:
        assert client.command("query-status") == {"return": RUNNING}
        reply = client.command("no-such-command")
        assert "id" not in reply, reply


@pytest.mark.parametrize("value", ["e1", 99, {"k": [1]}])
def test_id_echoed_on_error(tern, value):
    with raw_session(tern.address) as client:
        reply = client.command("no-such-command", id=value)
        assert_error(reply, "CommandNotFound", "The command no-such-command has not been found")
        assert reply.get("id") == value, reply
        reply = client.command("pmemsave", {"val": 0, "size": 16}, id=value)
        assert_error(reply, "GenericError", "Parameter 'filename' is missing")
        assert reply.get("id") == value, reply


def test_id_echoed_on_input_errors(tern):
    # QEMU takes the id from any object it can read, even when the object is otherwise bad.
    with raw_session(tern.address) as client:
        reply = client.command("query-status", foo=1, id=5)
        assert_error(reply, "GenericError", "QMP input member 'foo' is unexpected")
        assert reply.get("id") == 5, reply
        client.send({"execute": "query-status", "arguments": [], "id": "a"})
        reply = client.reply()
        assert_error(reply, "GenericError", "QMP input member 'arguments' must be an object")
        assert reply.get("id") == "a", reply


def test_id_echoed_before_negotiation(tern):
    with RawQMP(tern.address) as client:
        client.greeting()
        reply = client.command("query-status", id="early")
        assert_error(reply, "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        assert reply.get("id") == "early", reply
        assert client.command("qmp_capabilities", id="neg") == {"return": {}, "id": "neg"}


# (bytes sent, error class, exact desc or None, desc prefix or None)
BAD_INPUTS = {
    "parse-missing-value": (b'{"execute": }', "GenericError", None, "JSON parse error"),
    "parse-missing-colon": (b'{"execute" "query-status"}', "GenericError", None, "JSON parse error"),
    "parse-trailing-comma": (b'{"execute": "query-status",}', "GenericError", None, "JSON parse error"),
    "parse-bare-word": (b'hello', "GenericError", None, "JSON parse error"),
    "parse-unclosed-string": (b'{"execute": "query-status}', "GenericError", None, "JSON parse error"),
    "array": (b'[1]', "GenericError", "QMP input must be a JSON object", None),
    "number": (b'42', "GenericError", "QMP input must be a JSON object", None),
    "string": (b'"query-status"', "GenericError", "QMP input must be a JSON object", None),
    "null": (b'null', "GenericError", "QMP input must be a JSON object", None),
    "empty-object": (b'{}', "GenericError", "QMP input lacks member 'execute'", None),
    "only-arguments": (b'{"arguments": {}}', "GenericError", "QMP input lacks member 'execute'", None),
    "execute-number": (b'{"execute": 1}', "GenericError", "QMP input member 'execute' must be a string", None),
    "execute-object": (b'{"execute": {"a": 1}}', "GenericError", "QMP input member 'execute' must be a string", None),
    "arguments-array": (b'{"execute": "query-status", "arguments": []}', "GenericError",
                        "QMP input member 'arguments' must be an object", None),
    "arguments-string": (b'{"execute": "query-status", "arguments": "x"}', "GenericError",
                         "QMP input member 'arguments' must be an object", None),
    "unexpected-member": (b'{"execute": "query-status", "foo": 1}', "GenericError",
                          "QMP input member 'foo' is unexpected", None),
    "exec-oob-not-negotiated": (b'{"exec-oob": "query-status"}', "GenericError",
                                "QMP input member 'exec-oob' is unexpected", None),
    "unknown-command": (b'{"execute": "foo"}', "CommandNotFound", "The command foo has not been found", None),
    "missing-argument": (b'{"execute": "pmemsave", "arguments": {"val": 0, "size": 1}}', "GenericError",
                         "Parameter 'filename' is missing", None),
    "unexpected-argument": (b'{"execute": "query-status", "arguments": {"foo": 1}}', "GenericError",
                            "Parameter 'foo' is unexpected", None),
    "unexpected-argument-pmemsave": (
        b'{"execute": "pmemsave", "arguments": {"val": 0, "size": 1, "filename": "/dev/null", "foo": 2}}',
        "GenericError", "Parameter 'foo' is unexpected", None),
    "wrong-type-val": (b'{"execute": "pmemsave", "arguments": {"val": "zero", "size": 1, "filename": "/dev/null"}}',
                       "GenericError", "Invalid parameter type for 'val', expected: integer", None),
    "wrong-type-size": (b'{"execute": "pmemsave", "arguments": {"val": 0, "size": true, "filename": "/dev/null"}}',
                        "GenericError", "Invalid parameter type for 'size', expected: integer", None),
    "wrong-type-filename": (b'{"execute": "pmemsave", "arguments": {"val": 0, "size": 1, "filename": 7}}',
                            "GenericError", "Invalid parameter type for 'filename', expected: string", None),
    "hmp-missing-command-line": (b'{"execute": "human-monitor-command", "arguments": {}}', "GenericError",
                                 "Parameter 'command-line' is missing", None),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_refused_and_connection_survives(tern, name):
    data, error_class, desc, prefix = BAD_INPUTS[name]
    with raw_session(tern.address) as client:
        client.send_bytes(data + b"\n")
        reply = client.reply()
        assert_error(reply, error_class, desc, desc_prefix=prefix)
        check_usable(client)
        # And once more, to be sure the parser state was reset.
        client.send_bytes(data + b"\n")
        assert_error(client.reply(), error_class, desc, desc_prefix=prefix)
        check_usable(client)
    tern.assert_alive()


def test_bad_input_before_negotiation(tern):
    with RawQMP(tern.address) as client:
        client.greeting()
        client.send_bytes(b'{"execute": }\n')
        assert_error(client.reply(), "GenericError", desc_prefix="JSON parse error")
        client.send_bytes(b'[1]\n')
        assert_error(client.reply(), "GenericError", "QMP input must be a JSON object")
        assert client.command("qmp_capabilities") == {"return": {}}
        check_usable(client)


def test_pipelined_commands_answered_in_order(tern):
    with raw_session(tern.address) as client:
        batch = b"".join(json.dumps({"execute": "query-status", "id": i}).encode() + b"\n" for i in range(20))
        batch += b'{"execute": "nope", "id": "err"}\n{"execute": "query-kvm", "id": "last"}\n'
        client.send_bytes(batch)
        for i in range(20):
            assert client.reply() == {"return": RUNNING, "id": i}
        assert_error(client.reply(), "CommandNotFound")
        assert client.reply() == {"return": {"enabled": True, "present": True}, "id": "last"}


def test_command_split_across_writes(tern):
    with raw_session(tern.address) as client:
        message = b'{"execute": "query-status", "id": "split"}\n'
        for i in range(0, len(message), 5):
            client.send_bytes(message[i:i + 5])
            time.sleep(0.02)
        assert client.reply() == {"return": RUNNING, "id": "split"}


def test_crlf_and_whitespace_tolerated(tern):
    with raw_session(tern.address) as client:
        client.send_bytes(b'  {"execute": "query-status", "id": 1}\r\n')
        assert client.reply() == {"return": RUNNING, "id": 1}
        client.send_bytes(b'{ "execute" : "query-status" ,\t"id" : 2 }   \n')
        assert client.reply() == {"return": RUNNING, "id": 2}


def test_unicode_escapes_in_input(tern):
    with raw_session(tern.address) as client:
        # "query-status" with some letters escaped.
        client.send_bytes(b'{"execute": "query-\\u0073tatus", "id": "\\u00e9\\ud83d\\ude00"}\n')
        assert client.reply() == {"return": RUNNING, "id": "é😀"}
