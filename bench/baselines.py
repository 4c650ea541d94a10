"""The baselines a migration's throughput is judged against, measured on this machine in the
same run as the migrations (bench/throughput and bench/migrate import this):

  loopback      raw TCP over 127.0.0.1 between two processes, 1 MiB sendall / recv_into, no work
                on the data: what the socket layer alone carries.
  tls_loopback  the same bytes through OpenSSL alone (tools/tls-probe, compiled here with cc:
                TLS 1.3 AES-128-GCM as tern negotiates, 1 MiB SSL_write / SSL_read).

Also the test CA both benches give their TLS cases (tests/tls_certs.py, made once per process).
"""

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1 << 20
_PKI = {}


def tls_directories():
    """{name: directory} of tests/tls_certs.py's credentials, made once under /tmp."""
    if not _PKI:
        sys.path.insert(0, str(REPO / "tests"))
        from tls_certs import make_pki
        _PKI.update(make_pki(Path(tempfile.mkdtemp(prefix="tern-bench-pki-", dir="/tmp"))))
    return _PKI


def _receiver(port_queue, total):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port_queue.put(listener.getsockname()[1])
    connection, _ = listener.accept()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    left = total
    while left > 0:
        n = connection.recv_into(view, min(CHUNK, left))
        if n == 0:
            break
        left -= n
    connection.sendall(b"k")
    connection.close()


def loopback(total):
    """Seconds to move `total` bytes over loopback TCP between two processes."""
    queue = multiprocessing.Queue()
    receiver = multiprocessing.Process(target=_receiver, args=(queue, total))
    receiver.start()
    port = queue.get(timeout=10)
    data = os.urandom(CHUNK)
    sender = socket.create_connection(("127.0.0.1", port))
    start = time.monotonic()
    left = total
    while left > 0:
        sender.sendall(data[: min(CHUNK, left)])
        left -= min(CHUNK, left)
    sender.recv(1)
    elapsed = time.monotonic() - start
    sender.close()
    receiver.join(10)
    return elapsed


def tls_loopback(total):
    """Seconds for tools/tls-probe to move `total` bytes over TLS on loopback (one round)."""
    probe = Path("/tmp/tern-tls-probe")
    source = REPO / "tools" / "tls-probe" / "tls-probe.c"
    if not probe.exists() or probe.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-o", str(probe), str(source), "-lssl", "-lcrypto"], check=True)
    root = str(Path(tls_directories()["server"]).parent)
    output = subprocess.run([str(probe), root, str(total >> 20), "1"], check=True, capture_output=True, text=True).stdout
    fields = output.strip().splitlines()[-1].split()
    return float(fields[3])
