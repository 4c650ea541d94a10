"""libvirt drives tern: its recorded monitor traffic replayed the way libvirt 9.0 sends it.

The recordings (tests/data/libvirt, see its README) are libvirt's own: its capability probe of
QEMU, and a domain's start, live migration and start on the destination. Each is replayed as
libvirt does it: tern is started with libvirt's command line (the probe with -daemonize and a
pidfile; a domain with the monitor as an inherited listening socket and COM1 on a pty), lines end
in \\r\\n, one command at a time, the migration fd passed with getfd over SCM_RIGHTS, and each
reply judged by libvirt's rule for that command (fatal on error, or a tolerated error class).
The end-to-end test with a real libvirtd is scripts/libvirt/e2e (docs/libvirt.md).

Skipped, loudly, without /dev/kvm or the tern binary.
"""

from __future__ import annotations

import array
import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tern_harness import PASS_LINE, TERN_BINARY, free_tcp_port, new_workdir, skip_reason

_reason = skip_reason("libvirt replay")
if _reason:
    print(f"\n*** {_reason} ***\n")
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

DATA = Path(__file__).resolve().parent / "data" / "libvirt"

# libvirt 9.0's rules (src/qemu/qemu_capabilities.c, qemu_monitor_json.c): any error fails the probe.
FATAL = {"qmp_capabilities", "query-version", "query-target", "query-qmp-schema", "query-commands", "query-kvm",
         "qom-list-types", "query-machines", "query-command-line-options", "query-migrate-capabilities"}
# An error of this class means "none"; libvirt 9.0 crashes on DeviceNotFound from qom-list-properties,
# so that one must always answer a list.
TOLERATED = {"device-list-properties": "DeviceNotFound", "query-tpm-models": "CommandNotFound",
             "query-tpm-types": "CommandNotFound"}
# Sent only when the command is in query-commands (or the type in qom-list-types).
CONDITIONAL = {"query-cpu-definitions", "query-cpu-model-expansion", "query-sev-capabilities",
               "query-sgx-capabilities", "query-hotpluggable-cpus"}


def commands(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


class LibvirtMonitor:
    """A monitor client that behaves as libvirt's: \\r\\n-terminated lines, one command at a time,
    events kept in order, descriptors passed with the command that takes them."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(10)
        self.buffer = b""
        self.events: list[dict] = []
        self.log: list[tuple[str, str]] = []  # ("event"|"reply", name): the order things arrived

    def line(self, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"monitor closed; partial {self.buffer[:200]!r}")
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\r\n")
        return json.loads(raw)

    def execute(self, message: dict, fds: list[int] = ()) -> dict:
        data = (json.dumps(message) + "\r\n").encode()
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)
        while True:
            reply = self.line()
            if "QMP" in reply:
                continue  # libvirt ignores the greeting and never waits for it
            if "event" in reply:
                self.events.append(reply)
                self.log.append(("event", reply["event"]))
                continue
            assert "return" in reply or "error" in reply, f"{message['execute']}: not a reply: {reply}"
            self.log.append(("reply", message["execute"]))
            return reply

    def wait_event(self, name: str, data: dict | None = None, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name and (data is None or all(event.get("data", {}).get(k) == v for k, v in data.items())):
                    return event
            reply = self.line(max(0.01, deadline - time.monotonic()))
            if "event" in reply:
                self.events.append(reply)
                self.log.append(("event", reply["event"]))


def start_domain(workdir: Path, guest: Path, append: str, incoming: bool = False) -> tuple[subprocess.Popen, LibvirtMonitor]:
    """Starts tern as libvirt starts a domain's emulator: libvirt binds and listens on the monitor
    socket itself and passes the listening descriptor; the command line is the recorded one."""
    path = str(workdir / ("dst.sock" if incoming else "src.sock"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    argv = json.loads((DATA / "domain-argv.json").read_text())
    fixed: list[str] = []
    skip = False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        previous = argv[index - 1] if index else ""
        if previous == "-chardev" and arg.startswith("socket,id=charmonitor,fd="):
            arg = f"socket,id=charmonitor,fd={listener.fileno()},server=on,wait=off"
        elif previous == "-kernel":
            arg = str(guest)
        elif previous == "-append":
            arg = append
        elif arg == "-initrd":
            skip = True  # the built-in guest takes no initrd
            continue
        elif arg == "-msg" and incoming:
            fixed += ["-incoming", "defer"]
        fixed.append(arg)
    log = open(workdir / ("dst.err" if incoming else "src.err"), "wb")
    process = subprocess.Popen([TERN_BINARY] + fixed, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT)
    listener.close()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    return process, LibvirtMonitor(client)


class Console:
    """Reads the guest's COM1 from the pty that query-chardev names, as `virsh console` would."""

    def __init__(self, monitor: LibvirtMonitor):
        chardevs = monitor.execute({"execute": "query-chardev"})["return"]
        serial = [c for c in chardevs if c["label"] == "charserial0"]
        assert serial and serial[0]["filename"].startswith("pty:/dev/pts/"), f"no pty for charserial0: {chardevs}"
        self.fd = os.open(serial[0]["filename"][4:], os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        self.text = ""

    def read(self, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], max(0.01, deadline - time.monotonic()))
            if ready:
                try:
                    self.text += os.read(self.fd, 65536).decode(errors="replace")
                except BlockingIOError:
                    pass
        return self.text

    def wait_passes(self, count: int, timeout: float = 15) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout
        start = len(PASS_LINE.findall(self.text))
        while time.monotonic() < deadline:
            self.read(0.5)
            found = PASS_LINE.findall(self.text)
            if len(found) - start >= count:
                return [(int(n), verdict) for n, _, verdict in found[start:]]
        raise AssertionError(f"fewer than {count} pass lines on the console in {timeout} s:\n{self.text[-2000:]}")

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def guest_image():
    workdir = new_workdir()
    image = workdir / "guest.img"
    subprocess.run([TERN_BINARY, "guest-image", str(image)], check=True, capture_output=True)
    yield workdir, image
    if not os.environ.get("TERN_KEEP"):
        subprocess.run(["rm", "-rf", str(workdir)])
    else:
        print("kept", workdir)


def test_probe_replay(guest_image):
    """libvirt's capability probe: -daemonize returns once the monitor listens, the pidfile names
    the daemon, every command is answered as libvirt requires, and SIGTERM ends it cleanly."""
    workdir, _ = guest_image
    sock, pidfile = workdir / "qmp.monitor", workdir / "qmp.pid"
    started = subprocess.run([TERN_BINARY, "-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg",
                              "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", str(pidfile), "-daemonize"],
                             capture_output=True, timeout=30)
    assert started.returncode == 0, started.stderr.decode()
    pid = int(pidfile.read_text())
    try:
        assert os.path.exists(f"/proc/{pid}"), "the daemon named in the pidfile is not running"
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock))
        monitor = LibvirtMonitor(client)
        listed: set[str] = set()
        types: set[str] = set()
        for message in commands("probe.jsonl"):
            name = message["execute"]
            if name in CONDITIONAL and name not in listed:
                continue  # libvirt asks only when advertised
            reply = monitor.execute(message)
            if name in FATAL:
                assert "return" in reply, f"{name} failed, which fails libvirt's whole probe: {reply}"
            elif name in TOLERATED and "error" in reply:
                assert reply["error"]["class"] == TOLERATED[name], f"{name}: libvirt tolerates only {TOLERATED[name]}: {reply}"
            elif name == "qom-list-properties":
                assert isinstance(reply.get("return"), list), f"libvirt 9.0 crashes unless qom-list-properties answers a list: {reply}"
            result = reply.get("return")
            if name == "query-version":
                version = (result["qemu"]["major"], result["qemu"]["minor"], result["qemu"]["micro"])
                assert version >= (4, 2, 0), f"libvirt 9.0 needs QEMU >= 4.2.0: {result}"
                assert "tern" in result["package"], result
            elif name == "query-commands":
                listed = {c["name"] for c in result}
            elif name == "query-qmp-schema":
                names = [entry["name"] for entry in result]
                assert len(names) == len(set(names)), "libvirt rejects a schema with duplicate names"
            elif name == "query-kvm":
                assert result == {"enabled": True, "present": True}, result
            elif name == "qom-list-types":
                types = {t["name"] for t in result}
                assert "isa-serial" in types, "without isa-serial libvirt cannot start a domain with a serial console"
            elif name == "query-machines":
                assert any(m.get("is-default") for m in result), result
            elif name == "query-migrate-capabilities":
                capabilities = {c["capability"] for c in result}
                assert {"events", "return-path"} <= capabilities, f"libvirt migrates only with these: {capabilities}"
        assert monitor.execute({"execute": "cont"}).get("error"), "the none machine has no guest to run"
        os.kill(pid, signal.SIGTERM)  # libvirt ends a probe this way, without quit
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}"), "tern did not exit on SIGTERM"
        assert not pidfile.exists(), "the pidfile outlived the process"
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)


def test_daemonize_reports_a_failure_before_it_detaches(guest_image):
    """An error before the monitor listens makes the foreground process fail, saying why."""
    workdir, _ = guest_image
    started = subprocess.run([TERN_BINARY, "-S", "-machine", "none", "-qmp", f"unix:{workdir}/nodir/q.sock,server=on,wait=off",
                              "-daemonize"], capture_output=True, timeout=30)
    assert started.returncode == 1 and b"cannot listen for QMP" in started.stderr, started


def test_domain_start_suspend_resume_destroy(guest_image):
    """libvirt's start sequence on the inherited monitor socket, the pty console, suspend and
    resume by their events, and destroy by SIGTERM with SHUTDOWN reported."""
    workdir, image = guest_image
    process, monitor = start_domain(workdir, image, "wss=16M rate=8M")
    try:
        for message in commands("domain-source.jsonl"):
            if message["execute"] in ("query-block",) and ("reply", "cont") in monitor.log:
                break  # what follows is the migration, tested below
            reply = monitor.execute(message)
            name = message["execute"]
            if name == "qom-list" and message["arguments"]["path"].startswith("/machine/unattached"):
                assert reply["error"]["class"] == "DeviceNotFound", reply  # libvirt then skips its CPU check
            else:
                assert "return" in reply, f"{name}: {reply}"
            if name == "query-cpus-fast":
                assert reply["return"][0]["thread-id"] > 0
        monitor.wait_event("RESUME")  # libvirt counts the domain as running only now
        console = Console(monitor)
        passes = console.wait_passes(2)
        assert all(verdict == "ok" for _, verdict in passes), console.text
        assert "return" in monitor.execute({"execute": "stop"})
        monitor.wait_event("STOP")
        assert monitor.execute({"execute": "query-status"})["return"]["status"] == "paused"
        assert "return" in monitor.execute({"execute": "cont"})
        assert len([e for e in monitor.events if e["event"] == "RESUME"]) == 2
        console.wait_passes(2)
        console.close()
        process.send_signal(signal.SIGTERM)  # virsh destroy
        shutdown = monitor.wait_event("SHUTDOWN")
        assert shutdown["data"] == {"guest": False, "reason": "host-signal"}, shutdown
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_live_migration_as_libvirt_drives_it(guest_image):
    """`virsh migrate --live`'s monitor traffic on both sides: the destination started with
    -incoming defer, the source handed a socket libvirt connected itself (getfd + fd:migrate),
    progress followed by MIGRATION events only, STOP on the source, cont on the destination; the
    guest runs on with every page intact."""
    workdir, image = guest_image
    append = "wss=64M rate=32M"
    port = free_tcp_port()
    source, src = start_domain(workdir, image, append)
    destination, dst = start_domain(workdir, image, append, incoming=True)
    try:
        steps = commands("domain-source.jsonl")
        before = steps[:steps.index({"execute": "cont"}) + 1]
        for message in before:
            src.execute(message)
        src.wait_event("RESUME")
        console = Console(src)
        console.wait_passes(2)
        console.close()
        for message in commands("domain-destination.jsonl"):
            name = message["execute"]
            if name == "migrate-incoming":
                message = {"execute": name, "arguments": {"uri": f"tcp:127.0.0.1:{port}"}}
            if name == "query-chardev" and ("reply", "migrate-incoming") in dst.log:
                # libvirt's Finish phase starts once the source reports completion.
                run_source_migration(src, steps[len(before):], port)
                dst.wait_event("MIGRATION", {"status": "completed"})
            reply = dst.execute(message)
            if name == "qom-list" and message["arguments"]["path"].startswith("/machine/unattached"):
                continue
            assert "return" in reply, f"destination {name}: {reply}"
        dst.wait_event("RESUME")
        statuses = [e["data"]["status"] for e in dst.events if e["event"] == "MIGRATION"]
        assert statuses[0] == "setup" and statuses[-1] == "completed", statuses
        console = Console(dst)
        passes = console.wait_passes(3)
        assert all(verdict == "ok" for _, verdict in passes), console.text
        assert "CORRUPT" not in console.text, console.text
        console.close()
    finally:
        for process in (source, destination):
            if process.poll() is None:
                process.kill()


def run_source_migration(src: LibvirtMonitor, steps: list[dict], port: int) -> None:
    """The source's part: libvirt connects to the destination itself and passes the socket."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for message in steps:
            name = message["execute"]
            if name == "query-migrate":
                src.wait_event("MIGRATION", {"status": "completed"})
            reply = src.execute(message, fds=[connection.fileno()] if name == "getfd" else [])
            assert "return" in reply, f"source {name}: {reply}"
            if name == "migrate":
                # libvirt's job starts from the MIGRATION events; 'setup' must not trail the reply.
                order = [entry for entry in src.log if entry == ("reply", "migrate") or entry == ("event", "MIGRATION")]
                assert order and order[0] == ("event", "MIGRATION"), f"MIGRATION setup came after migrate's reply: {src.log[-6:]}"
    finally:
        connection.close()
    assert src.execute({"execute": "query-migrate"})["return"]["status"] == "completed"
    stop = [e for e in src.events if e["event"] == "STOP"]
    assert stop, "the source's switchover raised no STOP (libvirt marks the domain paused by it)"
