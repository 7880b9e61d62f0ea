"""A TPM TIS (FIFO interface) driver over QEMU's qtest socket: real TPM commands through QEMU.

QEMU started with ``-qtest unix:PATH,server=on,wait=off -qtest-log /dev/null -accel tcg -S``
accepts a line protocol on PATH (``readb ADDR`` -> ``OK 0xVALUE``, ``writeb ADDR VALUE`` ->
``OK``, likewise ``readl``/``writel``) that performs guest physical memory accesses; the TPM
TIS device's registers sit at 0xFED40000.  :class:`QtestTisTransport` implements the
:class:`vtpm_qcow.tpm.client.Transport` protocol the way a guest driver does (TCG PC Client TIS):

1. ACCESS (0x00): request locality 0 (requestUse) and wait for activeLocality.
2. STS (0x18): set commandReady; burstCount (bits 8..23) says how many bytes fit.
3. FIFO (0x24): write the command bytes; then STS tpmGo.
4. Poll STS until dataAvail (the backend, swtpm, has answered); read burstCount bytes from
   the FIFO until dataAvail clears; set commandReady again; relinquish the locality.

QEMU does not send TPM2_Startup itself; the caller does (``Tpm(transport).startup()``).
"""

from __future__ import annotations

import socket
import time

from ..errors import TpmTransportError
from .client import MAX_RESPONSE_SIZE, RESPONSE_HEADER

TIS_BASE = 0xFED40000
TIS_REG_ACCESS = 0x00
TIS_REG_STS = 0x18
TIS_REG_DATA_FIFO = 0x24
TIS_REG_DID_VID = 0xF00

TIS_ACCESS_VALID = 0x80
TIS_ACCESS_ACTIVE_LOCALITY = 0x20
TIS_ACCESS_REQUEST_USE = 0x02

TIS_STS_VALID = 0x80
TIS_STS_COMMAND_READY = 0x40
TIS_STS_GO = 0x20
TIS_STS_DATA_AVAILABLE = 0x10
TIS_STS_EXPECT = 0x08

#: Longest qtest reply line accepted (replies are short; bounds memory on garbage).
MAX_LINE = 1 << 16
#: Upper bound on waiting for the TPM (swtpm key generation may take seconds).
DEFAULT_TIMEOUT = 30.0


class QtestConnection:
    """One connection to QEMU's qtest socket speaking the text protocol."""

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            raise TpmTransportError(
                f"cannot connect to qtest socket: {err}", path=path, errno=err.errno
            ) from err
        self.buffer = b""

    def command(self, line: str) -> str:
        """Send one qtest command; return the text after ``OK`` (raise on ``FAIL``)."""
        try:
            self.sock.sendall(line.encode() + b"\n")
            while True:
                reply, sep, rest = self.buffer.partition(b"\n")
                if sep:
                    self.buffer = rest
                    text = reply.decode(errors="replace")
                    if text.startswith("IRQ"):
                        continue  # asynchronous interrupt notification, not our answer
                    break
                if len(self.buffer) > MAX_LINE:
                    raise TpmTransportError("qtest reply line too long", path=self.path)
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise TpmTransportError("qtest connection closed by QEMU", path=self.path)
                self.buffer += chunk
        except OSError as err:
            raise TpmTransportError(
                f"qtest '{line}' failed: {err}", path=self.path, errno=err.errno
            ) from err
        if not text.startswith("OK"):
            raise TpmTransportError(f"qtest '{line}' answered '{text}'", path=self.path)
        return text[2:].strip()

    def read(self, width: str, address: int) -> int:
        """``read{b,w,l}`` at ``address``."""
        return int(self.command(f"read{width} 0x{address:x}"), 16)

    def write(self, width: str, address: int, value: int) -> None:
        """``write{b,w,l}`` of ``value`` at ``address``."""
        self.command(f"write{width} 0x{address:x} 0x{value:x}")

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        self.sock.close()


class QtestTisTransport:
    """:class:`vtpm_qcow.tpm.client.Transport` through QEMU's TPM TIS device, locality 0."""

    def __init__(
        self, path: str, *, base: int = TIS_BASE, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.qtest = QtestConnection(path, timeout=timeout)
        self.base = base
        self.timeout = timeout

    def did_vid(self) -> int:
        """The DID_VID register (device id << 16 | vendor id)."""
        return self.qtest.read("l", self.base + TIS_REG_DID_VID)

    def status(self) -> int:
        """The STS register (status byte, burstCount in bits 8..23)."""
        return self.qtest.read("l", self.base + TIS_REG_STS)

    def wait_for(self, register: int, mask: int, what: str) -> int:
        """Poll byte ``register`` until all bits of ``mask`` are set; return its value."""
        deadline = time.monotonic() + self.timeout
        while True:
            value = self.qtest.read("b", self.base + register)
            if value & mask == mask:
                return value
            if time.monotonic() > deadline:
                raise TpmTransportError(
                    f"TIS register 0x{register:x} = 0x{value:02x}, "
                    f"{what} not reached within {self.timeout}s",
                    path=self.qtest.path,
                )
            time.sleep(0.0005)

    def transmit(self, command: bytes) -> bytes:
        """Send ``command`` through the TIS FIFO and read the response back."""
        access = self.base + TIS_REG_ACCESS
        sts = self.base + TIS_REG_STS
        fifo = self.base + TIS_REG_DATA_FIFO
        self.qtest.write("b", access, TIS_ACCESS_REQUEST_USE)
        self.wait_for(TIS_REG_ACCESS, TIS_ACCESS_VALID | TIS_ACCESS_ACTIVE_LOCALITY, "locality")
        try:
            self.qtest.write("b", sts, TIS_STS_COMMAND_READY)
            self.wait_for(TIS_REG_STS, TIS_STS_COMMAND_READY, "commandReady")
            burst = self.status() >> 8 & 0xFFFF
            if burst < len(command):
                raise TpmTransportError(
                    f"TIS burstCount {burst} < command size {len(command)}", path=self.qtest.path
                )
            for byte in command:
                self.qtest.write("b", fifo, byte)
            if self.status() & TIS_STS_EXPECT:
                raise TpmTransportError("TIS still expects command bytes", path=self.qtest.path)
            self.qtest.write("b", sts, TIS_STS_GO)
            self.wait_for(TIS_REG_STS, TIS_STS_VALID | TIS_STS_DATA_AVAILABLE, "dataAvail")
            response = bytearray()
            while self.status() & TIS_STS_DATA_AVAILABLE:
                if len(response) > MAX_RESPONSE_SIZE:
                    raise TpmTransportError(
                        f"TIS response exceeds {MAX_RESPONSE_SIZE} bytes", path=self.qtest.path
                    )
                burst = self.status() >> 8 & 0xFFFF
                response += bytes(self.qtest.read("b", fifo) for _ in range(max(burst, 1)))
            self.qtest.write("b", sts, TIS_STS_COMMAND_READY)
        finally:
            self.qtest.write("b", access, TIS_ACCESS_ACTIVE_LOCALITY)
        if len(response) < RESPONSE_HEADER.size:
            raise TpmTransportError(f"TIS response of {len(response)} bytes", path=self.qtest.path)
        return bytes(response)

    def close(self) -> None:
        """Close the qtest connection."""
        self.qtest.close()

    def __enter__(self) -> QtestTisTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
