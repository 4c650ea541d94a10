"""TLS on every migration connection, with mutual authentication: QEMU's tls-creds-x509 and
authz-simple objects (from -object and from QMP object-add), the tls-creds / tls-hostname /
tls-authz parameters, real tern processes on both ends, driven over QMP with qemu.qmp, and
certificates made for each case by tests/tls_certs.py.

A good pair migrates (single stream and multifd, under dirtying: digests equal, the guest's
self-check passes). Each bad certificate is refused at `migrate` with its reason, the source's
guest runs on, and the destination goes on waiting for a good source. A client with no TLS at
all never reaches the destination's loader.

Skipped, loudly, without /dev/kvm or the tern binary (TERN_BINARY, default .build/debug/tern).
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from migration_support import LinkProxy, asynctest, execute, execute_error, session, skip_reason, wait_migration, wait_status
from test_capabilities import check_completed, compare_and_resume, run_migration, set_capabilities
from test_migration import launch, tcp_uri  # noqa: F401 - launch is a fixture
from tls_certs import INTRUDER_IDENTITY, SOURCE_IDENTITY, make_pki

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

MiB = 1 << 20
DIRTYING = "wss=32M rate=16M"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_objects(pki, *, directory: str = "server", authz: bool = True, sanity: bool = True) -> list[str]:
    extra = ["-object", f"tls-creds-x509,id=tls0,dir={pki[directory]},endpoint=server,verify-peer=on"
             + ("" if sanity else ",sanity-check=off")]
    if authz:
        extra += ["-object", f"authz-simple,id=auth0,identity={SOURCE_IDENTITY.replace(',', ',,')}"]
    return extra


async def tls_destination(launch, pki, uri: str, *, directory: str = "server", authz: bool = True, sanity: bool = True,
                          capabilities=(), parameters=None, paused: bool = True):
    """A destination with its credentials from -object, TLS set over QMP, then listening."""
    dst = launch("dst", incoming="defer", paused=paused, extra=server_objects(pki, directory=directory, authz=authz, sanity=sanity))
    async with session(dst) as d:
        if capabilities:
            await set_capabilities(d, capabilities)
        settings = {"tls-creds": "tls0"}
        if authz:
            settings["tls-authz"] = "auth0"
        settings.update(parameters or {})
        assert await execute(d, "migrate-set-parameters", settings) == {}
        assert await execute(d, "migrate-incoming", {"uri": uri}) == {}
    return dst


async def add_client_creds(s, pki, directory: str = "client", **props) -> None:
    """The source's credentials through QMP object-add, as libvirt creates them."""
    arguments = {"qom-type": "tls-creds-x509", "id": "tls0", "dir": pki[directory], "endpoint": "client"}
    arguments.update(props)
    assert await execute(s, "object-add", arguments) == {}


@asynctest
async def test_tls_migration_completes(launch, pki):
    """Valid certificates on both sides, authz on the destination: the migration completes,
    both sides say TLS was used, the RAM digests agree and the guest runs on."""
    uri = tcp_uri()
    src = launch("src", append=DIRTYING)
    dst = await tls_destination(launch, pki, uri)
    async with session(src) as s:
        await add_client_creds(s, pki)
        parameters = await execute(s, "query-migrate-parameters")
        assert parameters["tls-creds"] == "" and parameters["tls-hostname"] == "" and parameters["tls-authz"] == "", parameters
        info = await run_migration(s, src, uri, bandwidth=64 * MiB, parameters={"tls-creds": "tls0"})
        await check_completed(s, src, info)
        assert (await execute(s, "query-migrate-parameters"))["tls-creds"] == "tls0"
    assert "TLS: connected to the destination and accepted by it (TLSv1.3" in src.stderr_text(), src.diagnostics()
    assert f"TLS: the source is authenticated as '{SOURCE_IDENTITY}' (TLSv1.3 TLS_AES_128_GCM_SHA256)" in dst.stderr_text(), dst.diagnostics()
    await compare_and_resume(src, dst)


@pytest.mark.parametrize("channels", [2, 4])
@asynctest
async def test_tls_multifd(launch, pki, channels):
    """Every multifd channel runs its own TLS session (and is authenticated like the main
    connection); the guest dirties pages throughout, so later passes go over every channel."""
    uri = tcp_uri()
    src = launch("src", append=DIRTYING)
    dst = await tls_destination(launch, pki, uri, capabilities=["multifd"], parameters={"multifd-channels": channels})
    # Through a proxy that keeps what each connection sends, to see it is TLS on the wire.
    proxy = LinkProxy(int(uri.rsplit(":", 1)[1]), capture=1 << 20)
    try:
        async with session(src) as s:
            await add_client_creds(s, pki)
            info = await run_migration(s, src, proxy.uri, bandwidth=64 * MiB, capabilities=["multifd"],
                                       parameters={"tls-creds": "tls0", "multifd-channels": channels})
            await check_completed(s, src, info)
    finally:
        proxy.cut()
    assert info["ram"]["multifd-bytes"] > 0, info
    assert info["ram"]["dirty-sync-count"] >= 2, info
    assert sorted(proxy.captured) == list(range(channels + 1)), proxy.captured.keys()
    for number, sent in proxy.captured.items():
        # A TLS handshake record (22, version 3.x) first; no tern magic in the clear anywhere.
        assert sent[0] == 22 and sent[1] == 3, f"connection {number} does not start with a TLS handshake: {bytes(sent[:8])!r}"
        assert b"TERNMIGR" not in sent and b"TERNMFD" not in sent, f"connection {number} carries a tern header in the clear"
    await compare_and_resume(src, dst)


# Each refusal: (what the source uses, the destination's options, words the source's error has,
# words the destination logs or None).
REFUSALS = {
    "server-expired": dict(client="client", server="server-expired", server_sanity=False,
                           source="certificate has expired", destination=None),
    "wrong-hostname": dict(client="client", hostname="wrong.tern.test",
                           source="hostname mismatch", destination=None),
    "untrusted-server": dict(client="server-untrusted",
                             source="the destination's certificate is not valid", destination=None),
    "client-without-certificate": dict(client="client-nocert",
                                       source="the destination refused this source's TLS certificate",
                                       destination="did not return a certificate"),
    "client-signed-by-rogue-ca": dict(client="client-rogue",
                                      source="the destination refused this source's TLS certificate",
                                      destination="the source's certificate is not valid"),
    "client-expired": dict(client="client-expired", client_sanity=False,
                           source="the destination refused this source's TLS certificate",
                           destination="certificate has expired"),
    "client-not-authorized": dict(client="client-intruder",
                                  source="tls-authz does not accept this source's certificate",
                                  destination=f"the source's identity '{INTRUDER_IDENTITY}' is not allowed by tls-authz 'auth0'"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
@asynctest
async def test_tls_refusal(launch, pki, case):
    """A bad certificate on either side, a wrong hostname or an identity tls-authz does not list:
    `migrate` fails with the reason, the source's guest runs on, and the destination (still in
    setup, its guest never started) logs why it refused and keeps listening."""
    spec = REFUSALS[case]
    uri = tcp_uri()
    src = launch("src")
    dst = await tls_destination(launch, pki, uri, directory=spec.get("server", "server"),
                                sanity=spec.get("server_sanity", True))
    async with session(src) as s:
        extra = {} if spec.get("client_sanity", True) else {"sanity-check": False}
        await add_client_creds(s, pki, spec["client"], **extra)
        parameters = {"tls-creds": "tls0"}
        if "hostname" in spec:
            parameters["tls-hostname"] = spec["hostname"]
        await src.wait_passes(1)
        assert await execute(s, "migrate-set-parameters", parameters) == {}
        error = await execute_error(s, "migrate", {"uri": uri})
        assert spec["source"] in error, error
        info = await execute(s, "query-migrate")
        assert info["status"] == "failed" and spec["source"] in info.get("error-desc", ""), info
        await wait_status(s, src, "running")
        seen = len(src.passes())
        await src.wait_passes(2, after=seen, timeout=10)
    async with session(dst) as d:
        assert (await execute(d, "query-migrate")).get("status") == "setup"
    if spec["destination"]:
        deadline = time.monotonic() + 5
        while spec["destination"] not in dst.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert spec["destination"] in dst.stderr_text(), dst.diagnostics()
    assert not dst.passes(), "the refusing destination ran a guest" + dst.diagnostics()


@asynctest
async def test_plaintext_client_never_reaches_the_loader(launch, pki):
    """A client that speaks no TLS (here, the start of a tern stream in the clear) is refused
    at the handshake: the loader never sees a byte, and a good source migrates afterwards."""
    uri = tcp_uri()
    src = launch("src")
    dst = await tls_destination(launch, pki, uri, authz=False)
    host, port = uri[len("tcp:"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as intruder:
        intruder.sendall(b"TERNMIGR" + b"\x02\x00\x00\x00" + b"\x00" * 4096)
        intruder.settimeout(5)
        try:
            while intruder.recv(4096):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
    deadline = time.monotonic() + 5
    while "refused a migration connection" not in dst.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    stderr = dst.stderr_text()
    assert "refused a migration connection: the source does not speak TLS" in stderr, dst.diagnostics()
    assert "incoming: loading" not in stderr, "the plaintext client reached the loader" + dst.diagnostics()
    async with session(src) as s:
        await add_client_creds(s, pki)
        info = await run_migration(s, src, uri, bandwidth=64 * MiB, parameters={"tls-creds": "tls0"})
        await check_completed(s, src, info)
    await compare_and_resume(src, dst)


@asynctest
async def test_source_without_tls_is_told_what_to_set(launch, pki):
    """A tern source with no tls-creds against a TLS destination: the destination answers in the
    clear with the return path's FAILED message, so the source's migrate fails saying what to
    set (not a bare connection reset); its guest runs on and the destination keeps listening."""
    uri = tcp_uri()
    src = launch("src")
    dst = await tls_destination(launch, pki, uri, authz=False)
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=64 * MiB, wanted=("failed",), timeout=20)
        assert "this destination takes migrations over TLS only: set tls-creds on the source" in info.get("error-desc", ""), info
        await wait_status(s, src, "running")
    async with session(dst) as d:
        assert (await execute(d, "query-migrate")).get("status") == "setup"
    assert "the source does not speak TLS" in dst.stderr_text(), dst.diagnostics()
    assert not dst.passes(), dst.diagnostics()


@asynctest
async def test_tls_source_to_plaintext_destination(launch, pki):
    """The other mismatch: a TLS source, a destination without tls-creds. The destination reads
    the ClientHello as its stream, refuses it naming TLS (and exits, as any failed load does);
    the source's migrate fails saying to set tls-creds on both sides, and its guest runs on."""
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming=uri)
    dst.expect_exit = True
    async with session(src) as s:
        await src.wait_passes(1)
        await add_client_creds(s, pki)
        assert await execute(s, "migrate-set-parameters", {"tls-creds": "tls0"}) == {}
        error = await execute_error(s, "migrate", {"uri": uri})
        assert "TLS handshake with the destination failed" in error and "set tls-creds on both sides" in error, error
        await wait_status(s, src, "running")
    assert await dst.wait_exit(timeout=10) == 1, dst.diagnostics()
    assert "the source speaks TLS but this destination does not: set tls-creds here" in dst.stderr_text(), dst.diagnostics()


@asynctest
async def test_tls_settings_are_checked(launch, pki, tmp_path):
    """The errors a user meets setting TLS up, each with what to fix, and the source untouched."""
    src = launch("src")
    async with session(src) as s:
        await src.wait_passes(1)
        # The types are listed as QEMU lists them (a client may look before it adds one).
        types = await execute(s, "qom-list-types", {"implements": "tls-creds"})
        assert [t["name"] for t in types] == ["tls-creds-x509"], types
        assert "identity" in [p["name"] for p in await execute(s, "qom-list-properties", {"typename": "authz-simple"})]
        missing = await execute_error(s, "object-add", {"qom-type": "tls-creds-x509", "id": "bad", "dir": str(tmp_path),
                                                        "endpoint": "client"})
        assert f"Unable to access credentials {tmp_path}/ca-cert.pem" in missing, missing
        wrong = await execute_error(s, "object-add", {"qom-type": "tls-creds-psk", "id": "psk0", "dir": str(tmp_path)})
        assert "use tls-creds-x509" in wrong, wrong
        await add_client_creds(s, pki)
        duplicate = await execute_error(s, "object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": pki["client"],
                                                          "endpoint": "client"})
        assert "duplicate" in duplicate, duplicate
        assert await execute(s, "object-add", {"qom-type": "tls-creds-x509", "id": "srv", "dir": pki["server"],
                                               "endpoint": "server"}) == {}
        expired = await execute_error(s, "object-add", {"qom-type": "tls-creds-x509", "id": "old",
                                                        "dir": pki["client-expired"], "endpoint": "client"})
        assert "has expired" in expired, expired

        async def refused(parameters: dict, uri: str, words: str) -> None:
            assert await execute(s, "migrate-set-parameters", parameters) == {}
            error = await execute_error(s, "migrate", {"uri": uri})
            assert words in error, error
            await wait_status(s, src, "running")

        await refused({"tls-creds": "nosuch"}, tcp_uri(), "No TLS credentials with id 'nosuch'")
        await refused({"tls-creds": "srv"}, tcp_uri(), "Expecting TLS credentials with a client endpoint")
        await refused({"tls-creds": "tls0"}, f"exec:cat > {tmp_path}/x", "TLS needs a socket")
        await refused({"tls-creds": "tls0"}, f"unix:{tmp_path}/none.sock", "No hostname available for TLS")
        # null switches TLS off again (QEMU's StrOrNull).
        assert await execute(s, "migrate-set-parameters", {"tls-creds": None, "tls-hostname": None}) == {}
        parameters = await execute(s, "query-migrate-parameters")
        assert parameters["tls-creds"] == "" and parameters["tls-hostname"] == "", parameters
        assert await execute(s, "object-del", {"id": "srv"}) == {}
        # Older libvirt's spelling: the properties inside "props", booleans as JSON booleans.
        assert await execute(s, "object-add", {"qom-type": "tls-creds-x509", "id": "legacy",
                                               "props": {"dir": pki["client"], "endpoint": "client", "verify-peer": True}}) == {}
        assert "duplicate" in await execute_error(s, "object-add", {"qom-type": "authz-simple", "id": "legacy",
                                                                    "identity": SOURCE_IDENTITY})
        assert await execute(s, "object-del", {"id": "legacy"}) == {}
        assert "not found" in await execute_error(s, "object-del", {"id": "srv"})
    bad_start = launch("bad", extra=["-object", f"tls-creds-x509,id=t,dir={tmp_path},endpoint=server"])
    bad_start.expect_exit = True
    assert await bad_start.wait_exit(timeout=20) == 1
    assert "Unable to access credentials" in bad_start.stderr_text(), bad_start.diagnostics()


@asynctest
async def test_tls_postcopy_cut_and_recovery(launch, pki):
    """Postcopy over TLS: the destination's page requests and the source's answers cross one TLS
    session in both directions at once; the link is cut mid-postcopy, and migrate-recover /
    migrate resume make a new TLS connection (authenticated again) on which it completes, with
    the destination's guest intact."""
    from migration_support import free_tcp_port
    from test_postcopy import (POSTCOPY_MEMORY, SLOW_APPEND, SLOW_BANDWIDTH, SLOW_POSTCOPY, check_both_completed,
                               listen_for_postcopy, prepare_source, reach_postcopy)
    from test_migration import check_destination_guest

    destination_port = free_tcp_port()
    src = launch("src", memory=POSTCOPY_MEMORY, append=SLOW_APPEND)
    dst = launch("dst", memory=POSTCOPY_MEMORY, append=SLOW_APPEND, incoming="defer",
                 extra=server_objects(pki, authz=True))
    proxy = None
    try:
        async with session(src) as s, session(dst) as d:
            assert await execute(d, "migrate-set-parameters", {"tls-creds": "tls0", "tls-authz": "auth0"}) == {}
            await listen_for_postcopy(d, dst, f"tcp:127.0.0.1:{destination_port}")
            proxy = LinkProxy(destination_port)
            await add_client_creds(s, pki)
            await prepare_source(s, src, bandwidth=SLOW_BANDWIDTH, parameters={**SLOW_POSTCOPY, "tls-creds": "tls0"})
            await reach_postcopy(s, d, src, dst, proxy.uri)
            await asyncio.sleep(0.5)  # pages and page requests in flight, both ways
            assert (await execute(s, "query-migrate"))["status"] == "postcopy-active"
            proxy.cut()
            await wait_migration(s, src, wanted=("postcopy-paused",), timeout=10)
            await wait_migration(d, dst, wanted=("postcopy-paused",), timeout=10)
            recover = tcp_uri()
            assert await execute(d, "migrate-recover", {"uri": recover}) == {}
            assert await execute(s, "migrate", {"uri": recover, "resume": True}) == {}
            info = await wait_migration(s, src, timeout=30)
            incoming = await wait_migration(d, dst, timeout=15)
            await check_both_completed(s, d, src, dst, info, incoming, False)
        # Two TLS sessions on the destination: the first connection and the recovery's.
        assert dst.stderr_text().count("TLS: the source is authenticated as") == 2, dst.diagnostics()
        await check_destination_guest(src, dst)
    finally:
        if proxy is not None:
            proxy.cut()
