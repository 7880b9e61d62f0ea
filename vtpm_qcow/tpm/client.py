"""Raw TPM 2.0 commands: builders, response parsers, and transports to swtpm.

The commands cover what the tests, benchmarks and demo need to put a TPM into a known state
and read it back: Startup/Shutdown, GetRandom, PCR_Extend/PCR_Read (sha256), NV define/
write/read/undefine, HierarchyChangeAuth, NV_ReadPublic and GetCapability.  Authorization is
always a password session (``TPM_RS_PW``).  The byte layouts follow "TPM 2.0 Library, Part 3:
Commands" (big endian; command header ``tag u16, size u32, commandCode u32``).

A :class:`Transport` moves one command to the TPM and returns its response; it knows nothing of
TPM semantics.  :class:`SwtpmSocketTransport` talks to ``swtpm socket`` (TCP or unix sockets),
:mod:`vtpm_qcow.tpm.qtest_tis` drives a TPM behind a real QEMU.  :class:`Tpm` builds commands,
sends them and raises :class:`TpmResponseError` for any non-zero response code.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import SwtpmError, TpmError, TpmResponseError, TpmTransportError
from .swtpm import CMD_INIT, connect_channel, control_command, socket_address

# -- Constants (TPM 2.0 Part 2: Structures) ---------------------------------------------------

TPM_ST_NO_SESSIONS = 0x8001
TPM_ST_SESSIONS = 0x8002

TPM_SU_CLEAR = 0x0000
TPM_SU_STATE = 0x0001

TPM_CC_NV_UNDEFINE_SPACE = 0x0122
TPM_CC_HIERARCHY_CHANGE_AUTH = 0x0129
TPM_CC_NV_DEFINE_SPACE = 0x012A
TPM_CC_NV_WRITE = 0x0137
TPM_CC_STARTUP = 0x0144
TPM_CC_SHUTDOWN = 0x0145
TPM_CC_NV_READ = 0x014E
TPM_CC_NV_READ_PUBLIC = 0x0169
TPM_CC_GET_CAPABILITY = 0x017A
TPM_CC_GET_RANDOM = 0x017B
TPM_CC_PCR_READ = 0x017E
TPM_CC_PCR_EXTEND = 0x0182

TPM_RH_OWNER = 0x40000001
TPM_RH_PLATFORM = 0x4000000C
TPM_RS_PW = 0x40000009

TPM_ALG_SHA256 = 0x000B
SHA256_DIGEST_SIZE = 32

TPM_RC_SUCCESS = 0x000
TPM_RC_INITIALIZE = 0x100

TPM_CAP_HANDLES = 0x00000001
TPM_CAP_TPM_PROPERTIES = 0x00000006
TPM_HT_NV_INDEX = 0x01
NV_INDEX_FIRST = 0x01000000
TPM_PT_MANUFACTURER = 0x00000105

# TPMA_NV bits
TPMA_NV_PPWRITE = 1 << 0
TPMA_NV_OWNERWRITE = 1 << 1
TPMA_NV_AUTHWRITE = 1 << 2
TPMA_NV_PPREAD = 1 << 16
TPMA_NV_OWNERREAD = 1 << 17
TPMA_NV_AUTHREAD = 1 << 18
TPMA_NV_NO_DA = 1 << 25
TPMA_NV_WRITTEN = 1 << 29

#: An ordinary data index: readable and writable with the owner's or the index's password.
NV_ATTRIBUTES_ORDINARY = (
    TPMA_NV_OWNERWRITE | TPMA_NV_AUTHWRITE | TPMA_NV_OWNERREAD | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA
)

#: PCR banks of a TPM 2.0 platform: 24 PCRs, selected by a 3-byte bitmap.
PCR_COUNT = 24
PCR_SELECT_SIZE = 3
#: Most digests one PCR_Read response carries (the TPM's TPML_DIGEST limit).
PCR_READ_MAX = 8

COMMAND_HEADER = struct.Struct(">HII")
RESPONSE_HEADER = struct.Struct(">HII")
#: Largest response we accept (TPM responses are at most a few KiB; 64 KiB bounds memory).
MAX_RESPONSE_SIZE = 0x10000


COMMAND_NAMES = {
    TPM_CC_NV_UNDEFINE_SPACE: "NV_UndefineSpace",
    TPM_CC_HIERARCHY_CHANGE_AUTH: "HierarchyChangeAuth",
    TPM_CC_NV_DEFINE_SPACE: "NV_DefineSpace",
    TPM_CC_NV_WRITE: "NV_Write",
    TPM_CC_STARTUP: "Startup",
    TPM_CC_SHUTDOWN: "Shutdown",
    TPM_CC_NV_READ: "NV_Read",
    TPM_CC_NV_READ_PUBLIC: "NV_ReadPublic",
    TPM_CC_GET_CAPABILITY: "GetCapability",
    TPM_CC_GET_RANDOM: "GetRandom",
    TPM_CC_PCR_READ: "PCR_Read",
    TPM_CC_PCR_EXTEND: "PCR_Extend",
}


# -- Marshalling -------------------------------------------------------------------------------


def tpm2b(data: bytes) -> bytes:
    """A TPM2B_* sized buffer: u16 size then the bytes."""
    if len(data) > 0xFFFF:
        raise TpmError(f"TPM2B buffer of {len(data)} bytes is too large")
    return struct.pack(">H", len(data)) + data


def password_auth(password: bytes = b"") -> bytes:
    """A command authorization area holding one password session (TPM_RS_PW)."""
    session = struct.pack(">I", TPM_RS_PW) + tpm2b(b"") + b"\x01" + tpm2b(password)
    return struct.pack(">I", len(session)) + session


def pcr_selection(pcrs: Iterable[int]) -> bytes:
    """A TPML_PCR_SELECTION selecting ``pcrs`` of the sha256 bank."""
    bitmap = bytearray(PCR_SELECT_SIZE)
    for pcr in pcrs:
        if not 0 <= pcr < PCR_COUNT:
            raise TpmError(f"PCR index {pcr} out of range 0..{PCR_COUNT - 1}")
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return struct.pack(">IHB", 1, TPM_ALG_SHA256, PCR_SELECT_SIZE) + bytes(bitmap)


def build_command(
    code: int,
    *,
    handles: Sequence[int] = (),
    auth: bytes | None = None,
    params: bytes = b"",
) -> bytes:
    """A complete command: header, handles, optional authorization area, parameters."""
    body = b"".join(struct.pack(">I", h) for h in handles)
    if auth is not None:
        body += auth
    tag = TPM_ST_NO_SESSIONS if auth is None else TPM_ST_SESSIONS
    return COMMAND_HEADER.pack(tag, COMMAND_HEADER.size + len(body) + len(params), code) + (
        body + params
    )


@dataclass(frozen=True)
class Response:
    """A parsed response: response code, returned handles and parameter bytes."""

    rc: int
    handles: tuple[int, ...]
    params: bytes


def parse_response(
    data: bytes, *, code: int, n_handles: int = 0, sessions: bool = False
) -> Response:
    """Split a response; raise :class:`TpmResponseError` on a non-zero response code.

    ``sessions`` says whether the command was sent with an authorization area (the response
    then carries a u32 parameterSize before the parameters and an auth area after them).
    """
    if len(data) < RESPONSE_HEADER.size:
        raise TpmError(f"TPM response of {len(data)} bytes is shorter than its header")
    tag, size, rc = RESPONSE_HEADER.unpack_from(data)
    if size != len(data):
        raise TpmError(f"TPM response size field {size} does not match {len(data)} bytes read")
    if rc != TPM_RC_SUCCESS:
        raise TpmResponseError(code, rc, name=COMMAND_NAMES.get(code))
    reader = Reader(data, RESPONSE_HEADER.size)
    handles = tuple(reader.u32() for _ in range(n_handles))
    with_sessions = sessions and tag == TPM_ST_SESSIONS
    params = reader.take(reader.u32()) if with_sessions else data[reader.pos :]
    return Response(rc, handles, params)


class Reader:
    """Sequential big-endian reader over a response; short data raises :class:`TpmError`."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, length: int) -> bytes:
        """The next ``length`` bytes."""
        end = self.pos + length
        if end > len(self.data):
            raise TpmError(f"TPM response truncated: need {end} bytes, have {len(self.data)}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        """The next u8."""
        return int(self.take(1)[0])

    def u16(self) -> int:
        """The next u16."""
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        """The next u32."""
        return int(struct.unpack(">I", self.take(4))[0])

    def tpm2b(self) -> bytes:
        """The next TPM2B_* buffer's content."""
        return self.take(self.u16())


# -- Transports --------------------------------------------------------------------------------


class Transport(Protocol):
    """Sends one TPM command and returns the TPM's complete response."""

    def transmit(self, command: bytes) -> bytes:
        """Send ``command`` and return the response bytes."""
        ...


def recv_exact(sock: socket.socket, length: int, what: str) -> bytes:
    """Read exactly ``length`` bytes from ``sock`` or raise :class:`TpmTransportError`."""
    chunks = bytearray()
    while len(chunks) < length:
        try:
            chunk = sock.recv(length - len(chunks))
        except OSError as err:
            raise TpmTransportError(f"receive failed: {err}", path=what, errno=err.errno) from err
        if not chunk:
            raise TpmTransportError("connection closed by the TPM", path=what)
        chunks += chunk
    return bytes(chunks)


def read_framed_response(recv: ReceiveFn, what: str) -> bytes:
    """Read one TPM response (header first, then the size it announces)."""
    header = recv(RESPONSE_HEADER.size)
    _, size, _ = RESPONSE_HEADER.unpack(header)
    if not RESPONSE_HEADER.size <= size <= MAX_RESPONSE_SIZE:
        raise TpmTransportError(f"response size field {size} out of range", path=what)
    return header + recv(size - RESPONSE_HEADER.size)


class ReceiveFn(Protocol):
    """Returns exactly ``length`` bytes of the response stream."""

    def __call__(self, length: int) -> bytes: ...


def connect(spec: str | int | tuple[str, int], timeout: float, what: str) -> socket.socket:
    """A connected stream socket with ``timeout``, or :class:`TpmTransportError`."""
    try:
        return connect_channel(spec, timeout)
    except OSError as err:
        address = socket_address(spec)[1]
        raise TpmTransportError(
            f"cannot connect to {address}: {err}", path=what, errno=err.errno
        ) from err


class SwtpmSocketTransport:
    """``swtpm socket``'s data channel (and optionally its control channel).

    ``server`` and ``ctrl`` are TCP ports, ``(host, port)`` pairs or unix socket paths, as
    given to swtpm's ``--server`` and ``--ctrl``.  With ``init=True`` (and a ``ctrl``), the
    TPM is powered on with CMD_INIT first, which swtpm needs unless started with
    ``--flags not-need-init``.  Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        server: str | int | tuple[str, int],
        ctrl: str | int | tuple[str, int] | None = None,
        *,
        init: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.what = f"swtpm {server}"
        self.timeout = timeout
        self.ctrl = ctrl
        if init:
            self.control(CMD_INIT, struct.pack(">I", 0))
        self.sock = connect(server, timeout, self.what)

    def control(self, command: int, payload: bytes = b"") -> int:
        """Send one control-channel command; raise unless swtpm answers success (0)."""
        if self.ctrl is None:
            raise TpmTransportError("no control channel given", path=self.what)
        what = f"swtpm control {self.ctrl}"
        try:
            result = control_command(self.ctrl, command, payload, timeout=self.timeout)
        except SwtpmError as err:
            raise TpmTransportError(err.message, path=what, errno=err.errno) from err
        if result != 0:
            raise TpmTransportError(f"command {command} returned 0x{result:x}", path=what)
        return int(result)

    def transmit(self, command: bytes) -> bytes:
        """Send ``command`` on the data channel and return the response."""
        try:
            self.sock.sendall(command)
        except OSError as err:
            raise TpmTransportError(f"send failed: {err}", path=self.what, errno=err.errno) from err
        return read_framed_response(
            lambda length: recv_exact(self.sock, length, self.what), self.what
        )

    def close(self) -> None:
        """Close the data connection."""
        self.sock.close()

    def __enter__(self) -> SwtpmSocketTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- The command set ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NvPublic:
    """An NV index's public area (TPMS_NV_PUBLIC)."""

    index: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    data_size: int


class Tpm:
    """TPM 2.0 commands over any :class:`Transport`; non-zero RCs raise TpmResponseError."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def run(
        self,
        code: int,
        *,
        handles: Sequence[int] = (),
        auth: bytes | None = None,
        params: bytes = b"",
        n_handles: int = 0,
    ) -> Response:
        """Build, send and parse one command."""
        command = build_command(code, handles=handles, auth=auth, params=params)
        reply = self.transport.transmit(command)
        return parse_response(reply, code=code, n_handles=n_handles, sessions=auth is not None)

    def startup(self, startup_type: int = TPM_SU_CLEAR) -> None:
        """TPM2_Startup(CLEAR or STATE)."""
        self.run(TPM_CC_STARTUP, params=struct.pack(">H", startup_type))

    def shutdown(self, shutdown_type: int = TPM_SU_STATE) -> None:
        """TPM2_Shutdown(STATE or CLEAR)."""
        self.run(TPM_CC_SHUTDOWN, params=struct.pack(">H", shutdown_type))

    def get_random(self, count: int) -> bytes:
        """TPM2_GetRandom: up to ``count`` random bytes (the TPM may return fewer)."""
        reply = self.run(TPM_CC_GET_RANDOM, params=struct.pack(">H", count))
        return Reader(reply.params).tpm2b()

    def pcr_extend(self, pcr: int, digest: bytes, *, auth: bytes = b"") -> None:
        """TPM2_PCR_Extend of the sha256 bank of ``pcr`` with a 32-byte ``digest``."""
        if len(digest) != SHA256_DIGEST_SIZE:
            raise TpmError(f"PCR_Extend digest is {len(digest)} bytes, sha256 needs 32")
        params = struct.pack(">IH", 1, TPM_ALG_SHA256) + digest
        self.run(TPM_CC_PCR_EXTEND, handles=[pcr], auth=password_auth(auth), params=params)

    def pcr_read(self, pcrs: Iterable[int] = range(PCR_COUNT)) -> dict[int, bytes]:
        """sha256 values of ``pcrs`` (several PCR_Read calls if the TPM returns a subset)."""
        wanted = sorted(set(pcrs))
        values: dict[int, bytes] = {}
        while len(values) < len(wanted):
            remaining = [p for p in wanted if p not in values]
            reply = self.run(TPM_CC_PCR_READ, params=pcr_selection(remaining))
            reader = Reader(reply.params)
            reader.u32()  # pcrUpdateCounter
            selected: list[int] = []
            for _ in range(reader.u32()):
                reader.u16()  # hash algorithm
                bitmap = reader.take(reader.u8())
                selected += [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
            digests = [reader.tpm2b() for _ in range(reader.u32())]
            if not digests or len(digests) != len(selected):
                raise TpmError(f"PCR_Read returned {len(digests)} digests for {selected}")
            values.update(zip(selected, digests, strict=True))
        return {p: values[p] for p in wanted}

    def nv_define_space(
        self,
        index: int,
        size: int,
        *,
        attributes: int = NV_ATTRIBUTES_ORDINARY,
        index_auth: bytes = b"",
        owner_auth: bytes = b"",
    ) -> None:
        """TPM2_NV_DefineSpace under the owner hierarchy (sha256 name, no policy)."""
        public = struct.pack(">IHI", index, TPM_ALG_SHA256, attributes) + tpm2b(b"")
        public += struct.pack(">H", size)
        self.run(
            TPM_CC_NV_DEFINE_SPACE,
            handles=[TPM_RH_OWNER],
            auth=password_auth(owner_auth),
            params=tpm2b(index_auth) + tpm2b(public),
        )

    def nv_undefine_space(self, index: int, *, owner_auth: bytes = b"") -> None:
        """TPM2_NV_UndefineSpace with the owner's password."""
        self.run(
            TPM_CC_NV_UNDEFINE_SPACE,
            handles=[TPM_RH_OWNER, index],
            auth=password_auth(owner_auth),
        )

    def nv_write(
        self, index: int, data: bytes, *, offset: int = 0, auth: bytes = b"", owner: bool = False
    ) -> None:
        """TPM2_NV_Write, authorized by the index's password (or the owner's if ``owner``)."""
        auth_handle = TPM_RH_OWNER if owner else index
        self.run(
            TPM_CC_NV_WRITE,
            handles=[auth_handle, index],
            auth=password_auth(auth),
            params=tpm2b(data) + struct.pack(">H", offset),
        )

    def nv_read(
        self, index: int, size: int, *, offset: int = 0, auth: bytes = b"", owner: bool = False
    ) -> bytes:
        """TPM2_NV_Read of ``size`` bytes at ``offset``."""
        auth_handle = TPM_RH_OWNER if owner else index
        reply = self.run(
            TPM_CC_NV_READ,
            handles=[auth_handle, index],
            auth=password_auth(auth),
            params=struct.pack(">HH", size, offset),
        )
        return Reader(reply.params).tpm2b()

    def nv_read_public(self, index: int) -> NvPublic:
        """TPM2_NV_ReadPublic: the index's public area."""
        reply = self.run(TPM_CC_NV_READ_PUBLIC, handles=[index])
        public = Reader(Reader(reply.params).tpm2b())
        return NvPublic(
            index=public.u32(),
            name_alg=public.u16(),
            attributes=public.u32(),
            auth_policy=public.tpm2b(),
            data_size=public.u16(),
        )

    def hierarchy_change_auth(self, new_auth: bytes, *, owner_auth: bytes = b"") -> None:
        """TPM2_HierarchyChangeAuth of the owner hierarchy."""
        self.run(
            TPM_CC_HIERARCHY_CHANGE_AUTH,
            handles=[TPM_RH_OWNER],
            auth=password_auth(owner_auth),
            params=tpm2b(new_auth),
        )

    def nv_indices(self) -> list[int]:
        """Handles of all defined NV indices (TPM2_GetCapability(TPM_CAP_HANDLES))."""
        handles: list[int] = []
        first = NV_INDEX_FIRST
        while True:
            reply = self.run(
                TPM_CC_GET_CAPABILITY,
                params=struct.pack(">III", TPM_CAP_HANDLES, first, 64),
            )
            reader = Reader(reply.params)
            more = reader.u8()
            reader.u32()  # capability
            batch = [reader.u32() for _ in range(reader.u32())]
            handles += [h for h in batch if h >> 24 == TPM_HT_NV_INDEX]
            if not more or not batch or batch[-1] >> 24 != TPM_HT_NV_INDEX:
                return handles
            first = batch[-1] + 1

    def owner_auth_is(self, owner_auth: bytes) -> bool:
        """Whether ``owner_auth`` is the owner password.

        Probed with HierarchyChangeAuth to the same value: a wrong password fails the
        session check (TPM_RC_BAD_AUTH / TPM_RC_AUTH_FAIL; permanent hierarchies are exempt
        from dictionary-attack lockout), a right one leaves the password as it was.
        """
        try:
            self.hierarchy_change_auth(owner_auth, owner_auth=owner_auth)
        except TpmResponseError as err:
            if err.rc & RC_FMT1_NUMBERLESS in (TPM_RC_BAD_AUTH, TPM_RC_AUTH_FAIL):
                return False
            raise
        return True


TPM_RC_AUTH_FAIL = 0x08E
TPM_RC_BAD_AUTH = 0x0A2
#: Format-one response codes carry a handle/parameter/session number in bits 8..11.
RC_FMT1_NUMBERLESS = 0x0BF


def sha256(data: bytes) -> bytes:
    """sha256 digest of ``data`` (for PCR_Extend)."""
    return hashlib.sha256(data).digest()
