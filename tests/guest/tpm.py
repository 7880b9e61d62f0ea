"""The guest's TPM through tpm2-tools on /dev/tpmrm0, and host-side oracles of TPM state.

In the guest: an NV counter and an NV data index (owner authorized), a PCR, the owner
password, and a background load of NV increments.  On the host: the vTPM image's and the
disk's snapshot tags per ``qemu-img``, the permall blob of a vTPM image's active layer or
snapshot (``qemu-img convert`` + swtpm's linear file layout), and what an NV counter holds
in such a blob (read by a real swtpm with tpm2-tools).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.guest.machine import Guest, GuestError
from tests.helpers import need
from tests.vm.qemu_fixtures import run_tool, swtpm_process, swtpm_tcti

#: NV counter, owner authorized (``ownerread|ownerwrite|nt=counter``).
COUNTER = 0x01500010
#: NV data index of DATA_SIZE bytes, owner authorized.
DATA = 0x01500011
DATA_SIZE = 16
#: NV counter of the background load, authorized by its own (empty) auth value, so the load
#: does not depend on the owner password.
LOAD_COUNTER = 0x01500012
PCR = 16


def _octal(data: bytes) -> str:
    """``data`` as printf octal escapes (busybox printf writes NULs this way)."""
    return "".join(f"\\{b:03o}" for b in data)


def nv_increment_command(index: int) -> bytes:
    """TPM2_NV_Increment of ``index`` authorized by the index itself, empty password."""
    session = struct.pack(">IHBH", 0x40000009, 0, 0, 0)  # TPM_RS_PW, no nonce, empty hmac
    body = struct.pack(">II", index, index) + struct.pack(">I", len(session)) + session
    return struct.pack(">HII", 0x8002, 10 + len(body), 0x00000134) + body


#: The guest's background load.  tpm2_nvincrement manages about 3 increments a second under
#: TCG (0.16 s of each run is loading tpm2 and its 35 libraries, the rest ESYS and OpenSSL),
#: too few to hit the moment between a VM's pause and the watcher's snapshot reliably, and a
#: tpm2_nvincrement loop beside it halves the rate below.  So the loop sends the same
#: TPM2_NV_Increment itself through /dev/tpmrm0 from busybox sh: no process per command,
#: about 600 increments a second here.  Reading one byte of the response is enough for the
#: kernel to take the next command.  It writes its count when it stops.
LOAD_SCRIPT = f"""
exec 3<>/dev/tpmrm0
n=0
while [ ! -e /tmp/load.stop ]; do
    printf '{_octal(nv_increment_command(LOAD_COUNTER))}' >&3 && read -r -n 1 -u 3 x && n=$((n + 1))
done
echo $n > /tmp/load.count
"""


@dataclass(frozen=True)
class TpmView:
    """What the guest reads from its TPM."""

    counter: int
    data: bytes
    pcr: str
    owner: str


class GuestTpm:
    """tpm2-tools in the guest (``TPM2TOOLS_TCTI=device:/dev/tpmrm0``).

    Every tool run costs about 0.3 s under TCG, so reads are batched into one command line.
    """

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        #: The owner password the test believes the TPM has.
        self.owner = ""
        #: Every owner password the test ever set (a loaded snapshot may hold any of them).
        self.owners: list[str] = [""]

    def _auth(self) -> str:
        return f"-P '{self.owner}'" if self.owner else ""

    def define(self) -> None:
        """Define the counter, the data index and the load counter (each written once)."""
        o = self._auth()
        self.guest.ok(
            f"tpm2_nvdefine -C o {o} -s 8 -a 'ownerread|ownerwrite|nt=counter' {COUNTER:#x} && "
            f"tpm2_nvdefine -C o {o} -s {DATA_SIZE} -a 'ownerread|ownerwrite' {DATA:#x} && "
            f"tpm2_nvdefine -C o {o} -s 8 -a 'authread|authwrite|nt=counter' {LOAD_COUNTER:#x} "
            f"&& tpm2_nvincrement -C {LOAD_COUNTER:#x} {LOAD_COUNTER:#x}"
        )
        self.increment()
        self.write(b"initial")

    def increment(self) -> None:
        """Increment the counter."""
        self.guest.ok(f"tpm2_nvincrement -C o {self._auth()} {COUNTER:#x}")

    def load_counter(self) -> int:
        """The load counter's value."""
        out = self.guest.ok(
            f"tpm2_nvread -C {LOAD_COUNTER:#x} -s 8 -o /tmp/nv {LOAD_COUNTER:#x} && "
            "od -An -tx1 -v /tmp/nv"
        )
        return int("".join(out.split()), 16)

    def write(self, data: bytes) -> None:
        """Write ``data`` (padded with NULs) into the data index."""
        padded = data.ljust(DATA_SIZE, b"\0")
        self.guest.ok(f"printf '{_octal(padded)}' | tpm2_nvwrite -C o {self._auth()} -i- {DATA:#x}")

    def extend(self, text: str) -> None:
        """Extend the PCR with sha256(``text``)."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        self.guest.ok(f"tpm2_pcrextend {PCR}:sha256={digest}")

    def change_owner(self, new: str) -> None:
        """Set the owner password to ``new`` (empty: none)."""
        old = f"-p '{self.owner}'" if self.owner else ""
        self.guest.ok(f"tpm2_changeauth -c o {old} {new}".rstrip())
        self.owner = new
        if new not in self.owners:
            self.owners.append(new)

    def view(self) -> TpmView:
        """Everything the guest reads: counter, data, PCR and owner password.

        The owner password is found by trying each one ever set (the believed one first)
        on an owner-authorized read of the counter; owner authorization failures have no
        dictionary-attack consequences.
        """
        candidates = [self.owner, *(o for o in self.owners if o != self.owner)]
        words = " ".join(f"'{o}'" for o in candidates)
        out = self.guest.ok(
            f'for p in {words}; do if tpm2_nvread -C o -P "$p" -s 8 -o /tmp/c {COUNTER:#x} '
            '2>/dev/null; then echo "owner=[$p]"; break; fi; done; '
            f'tpm2_nvread -C o -P "$p" -s {DATA_SIZE} -o /tmp/d {DATA:#x} && '
            f"tpm2_pcrread sha256:{PCR} -o /tmp/p >/dev/null && "
            "echo counter=$(od -An -tx1 -v /tmp/c) && echo data=$(od -An -tx1 -v /tmp/d) && "
            "echo pcr=$(od -An -tx1 -v /tmp/p)"
        )
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if "owner" not in values:
            raise GuestError(f"none of the owner passwords {candidates} works: {out}")
        self.owner = values["owner"].removeprefix("[").removesuffix("]")
        data = bytes.fromhex("".join(values["data"].split())).rstrip(b"\0")
        counter = int("".join(values["counter"].split()), 16)
        return TpmView(counter, data, "".join(values["pcr"].split()), self.owner)

    def start_load(self) -> None:
        """Start the background NV increment loop."""
        encoded = base64.b64encode(LOAD_SCRIPT.encode()).decode()
        self.guest.ok(f"echo {encoded} | base64 -d > /tmp/load.sh")
        self.guest.ok("rm -f /tmp/load.stop /tmp/load.count")
        self.guest.ok("(sh /tmp/load.sh &) >/dev/null 2>&1")

    def stop_load(self) -> int:
        """Stop the loop; how many increments it did since it started."""
        out = self.guest.ok(
            "touch /tmp/load.stop; i=0; while [ ! -e /tmp/load.count ]; do "
            "sleep 0.1; i=$((i + 1)); [ $i -lt 100 ] || exit 1; done; cat /tmp/load.count"
        )
        return int(out)


# Section: host-side oracles


def snapshot_tags(image: Path) -> list[str]:
    """Snapshot tags of a qcow2 file per qemu-img (-U: it may be in use)."""
    out = run_tool(need("qemu-img"), "info", "-U", "--output=json", str(image)).stdout
    return [s["name"] for s in json.loads(out).get("snapshots", [])]


def linear_permall(raw: bytes) -> bytes | None:
    """The permall blob of swtpm's linear file (slot 0), None if the slot is empty."""
    magic, version, _pad, hdrsize = struct.unpack_from("<QBBH", raw)
    if magic != 0x737774706D6C696E or version != 1:
        raise AssertionError(f"not an swtpm linear file (magic {magic:#x}, version {version})")
    offset, length, _section = struct.unpack_from("<III", raw, 12)
    assert hdrsize >= 12 + 15 * 12
    return raw[offset : offset + length] if offset else None


def permall(image: Path, tag: str | None = None) -> bytes:
    """The permall blob of ``image``'s active layer or snapshot ``tag`` (via qemu-img)."""
    with tempfile.TemporaryDirectory(prefix="permall-") as scratch:
        raw = Path(scratch) / "state.raw"
        args = ["convert", "-U", "-f", "qcow2", "-O", "raw"]
        if tag:
            args += ["-l", f"snapshot.name={tag}"]
        run_tool(need("qemu-img"), *args, str(image), str(raw))
        blob = linear_permall(raw.read_bytes())
    if blob is None:
        raise AssertionError(f"{image} {tag or '(active)'}: no permall")
    return blob


def counter_in(blob: bytes, index: int = LOAD_COUNTER) -> int:
    """The value of NV counter ``index`` (authorized by itself) in TPM state ``blob``.

    A real swtpm loads the blob as its ``tpm2-00.permall`` and tpm2_nvread reads the index.
    """
    with tempfile.TemporaryDirectory(prefix="counter-") as scratch:
        state = Path(scratch)
        (state / "tpm2-00.permall").write_bytes(blob)
        flags = "not-need-init,startup-clear"
        with swtpm_process(f"dir={state}", state, tcp=True, flags=flags) as swtpm:
            out = state / "value"
            run_tool(
                need("tpm2_nvread"), "-T", swtpm_tcti(swtpm), "-C", f"{index:#x}",
                "-s", "8", "-o", str(out), f"{index:#x}",
            )  # fmt: skip
            return int.from_bytes(out.read_bytes(), "big")


def digest(blob: bytes) -> str:
    """A short digest for messages."""
    return hashlib.sha256(blob).hexdigest()[:12]
