"""Would swtpm load this TPM state?  Cheap structural checks and a dry load by a real swtpm.

An image can be clean to ``qemu-img check`` and still hold a state swtpm refuses: the file
view once committed swtpm's half-done stores (it msyncs a store's header page before its
data pages), leaving a permall whose first page is new and whose rest is old.  Two levels:

* :func:`layout_problem` (no swtpm, microseconds): the checks swtpm and libtpms make
  before they look inside the TPM's own data: the linear header, every section inside the
  layout, each blob's header and TLVs as swtpm's ``SWTPM_NVRAM_CheckHeader`` and
  ``tlv_data_find_tag`` read them, libtpms' magic at the start of a plain TPM 2.0 permall,
  and a permall to load at all.  It cannot see a torn permall whose first page (blob
  header, TLV lengths, magic) is consistent: only libtpms' unmarshalling of the rest can.
* :func:`probe_layout` (a real swtpm, tens of milliseconds): writes the layout to a private
  temporary linear file, starts ``swtpm socket`` on it with ``startup-clear`` and sends
  TPM2_GetRandom.  swtpm exiting, or libtpms answering TPM_RC_FAILURE (failure mode), means
  the state does not load.
"""

from __future__ import annotations

import os
import struct

from ..errors import StateFormatError, SwtpmError, TpmError, TpmResponseError
from . import linear
from .blob import (
    BLOB_FLAG_ENCRYPTED,
    BLOB_HEADER_STRUCT,
    BLOB_HEADER_VERSION,
    TAG_DATA,
    TLV_HEADER_STRUCT,
    TPM2_PERMALL_MAGIC,
)
from .record import Record
from .secret import staging_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Final

    from ..tpm.swtpm import Swtpm

#: libtpms' TPM_RC_FAILURE: the TPM is in failure mode (its state did not unmarshal).
TPM_RC_FAILURE: Final = 0x101
#: TPM 1.2's TPM_FAILEDSELFTEST (a TPM 1.2 whose state did not load).
TPM12_FAILEDSELFTEST: Final = 0x1C
#: TPM 1.2 TPM_GetRandom(16): tag TPM_TAG_RQU_COMMAND, size 14, TPM_ORD_GetRandom.
_TPM12_GET_RANDOM: Final = struct.pack(">HIII", 0x00C1, 14, 0x46, 16)
NO_STATE: Final = "no TPM state: swtpm would manufacture a new TPM"


class ProbeResult(Record):
    """Whether swtpm loads a state; ``reason`` says why not (one line), else None.

    ``dry_loaded`` is False when the state could not be tried (an encrypted state needs
    swtpm's key): ``loadable`` is then True (nothing says otherwise) and ``reason`` says so.
    """

    __slots__ = _FIELDS = ("loadable", "reason", "dry_loaded")
    loadable: bool
    reason: str | None
    dry_loaded: bool

    def __init__(self, loadable: bool, reason: str | None = None, dry_loaded: bool = True) -> None:
        self._init(loadable, reason, dry_loaded)


def _swtpm_payload(data: bytes) -> tuple[bytes | None, str]:
    """The bytes swtpm 0.7.1 hands libtpms for a stored blob without a key (None if it
    finds none, or an encrypted blob: opaque), and what it took them from.

    Mirrors ``SWTPM_NVRAM_LoadData``: ``SWTPM_NVRAM_CheckHeader`` accepts a header only
    if totlen is the blob's length, min_version <= 2 and hdrsize == 10; anything else is a
    headerless version 1 blob passed on whole.  A version 1 header is followed by the
    payload itself; later versions by TLVs, searched with ``tlv_data_find_tag`` (the first
    DATA TLV before any TLV that overruns the blob).
    """
    if len(data) >= BLOB_HEADER_STRUCT.size:
        version, min_version, hdrsize, flags, totlen = BLOB_HEADER_STRUCT.unpack_from(data)
        checks_out = (
            totlen == len(data)
            and min_version <= BLOB_HEADER_VERSION
            and hdrsize == BLOB_HEADER_STRUCT.size
        )
    else:
        checks_out = False
    if not checks_out:
        return data, "headerless blob"
    if flags & BLOB_FLAG_ENCRYPTED:
        return None, "encrypted blob"
    body = data[hdrsize:]
    if version == 1:
        return body, f"version {version} blob"
    pos = 0
    while pos + TLV_HEADER_STRUCT.size <= len(body):
        tag, length = TLV_HEADER_STRUCT.unpack_from(body, pos)
        pos += TLV_HEADER_STRUCT.size
        if pos + length > len(body):
            break
        if tag == TAG_DATA:
            return body[pos : pos + length], "data TLV"
        pos += length
    return None, f"version {version} blob"


def blob_problem(data: bytes, name: str, *, tpm2: bool | None = None) -> str | None:
    """What swtpm/libtpms would refuse in the blob of section ``name`` (one line starting
    with ``name``), or None.

    swtpm refuses a blob with a valid header but no DATA TLV it can find ("Could not find
    plain data in byte stream"); libtpms refuses a TPM 2.0 permall payload without its
    magic ("Invalid magic").  A payload that is no TPM 2.0 permall but starts like a TPM
    1.2 one passes unless ``tpm2`` says the TPM is a 2.0.
    """
    if not data:
        return f"{name}: empty blob"
    payload, where = _swtpm_payload(data)
    if where == "encrypted blob":
        return None  # the TPM's own bytes are opaque without the key
    if payload is None:
        return f"{name}: {where} without a data TLV swtpm can find (TLVs overrun or absent)"
    if (
        name == "permall"
        and tpm2 is not False
        and payload[2:6] != TPM2_PERMALL_MAGIC
        and (tpm2 or not _looks_tpm12(payload))
    ):
        return (
            f"{name}: {where} does not start with libtpms' TPM 2.0 magic "
            f"{TPM2_PERMALL_MAGIC.hex()} (found {payload[2:6].hex() or 'nothing'})"
        )
    return None


def _looks_tpm12(payload: bytes) -> bool:
    """True if a permall payload may be a TPM 1.2's: libtpms' TPM 1.2 state starts with a
    u16 version and the TPM_TAG_PERMANENT_DATA tag 0x0022."""
    return payload[2:4] == b"\x00\x22"


def layout_problem(layout: bytes, *, source: str, tpm2: bool | None = None) -> str | None:
    """Why swtpm would not load the linear ``layout`` (one line naming ``source`` and the
    section), or None when the checks swtpm makes before libtpms unmarshals pass.

    ``layout`` is the linear file's bytes up to the end of its last section (what
    :meth:`vtpm_qcow.state.store.Store.layout` returns; ``b""`` = not formatted).  ``tpm2``
    tells the TPM version when known (None: decided from the permall).
    """
    if not linear.is_formatted(layout):
        return f"{source}: {NO_STATE}"
    try:
        header = linear.parse_header(layout, source=source)
    except StateFormatError as err:
        return str(err)
    if not header.slot("permall").allocated:
        return f"{source}: {NO_STATE}"
    for name in linear.SECTION_NAMES:
        slot = header.slot(name)
        if not slot.allocated:
            continue
        blob = bytes(layout[slot.offset : slot.offset + slot.data_length])
        problem = blob_problem(blob, name, tpm2=tpm2)
        if problem is not None:
            return f"{source}: {problem}"
    return None


def _is_encrypted(layout: bytes) -> bool:
    """True if swtpm would need its key to read the permall."""
    return _swtpm_payload(linear.read_section(layout, "permall") or b"")[1] == "encrypted blob"


def _is_tpm12(layout: bytes) -> bool:
    """True for a plain TPM 1.2 state (swtpm must then run without --tpm2)."""
    payload = _swtpm_payload(linear.read_section(layout, "permall") or b"")[0]
    return payload is not None and payload[2:6] != TPM2_PERMALL_MAGIC and _looks_tpm12(payload)


def probe_layout(
    layout: bytes, *, source: str, timeout: float = 20.0, state_key: bytes | None = None
) -> ProbeResult:
    """Dry-load ``layout`` in a real swtpm and say whether the TPM works on it.

    The layout goes to a private temporary file (mode 0600, its directory removed
    afterwards); swtpm runs on it with ``--flags not-need-init,startup-clear`` and gets one
    GetRandom.  swtpm is always stopped.  A missing swtpm raises
    :class:`~vtpm_qcow.errors.SwtpmError`; so does a swtpm that neither answers nor exits
    within ``timeout`` seconds.  Layouts without a permall are not loadable without
    starting swtpm (it would manufacture a new TPM).  A state swtpm encrypted with its own
    key is dry-loaded only with ``state_key``, its passphrase.
    """
    if not linear.is_formatted(layout):
        return ProbeResult(False, NO_STATE)
    try:
        header = linear.parse_header(layout, source=source)
    except StateFormatError as err:
        return ProbeResult(False, str(err))
    if not header.slot("permall").allocated:
        return ProbeResult(False, NO_STATE)
    # only a dry load needs these (info and serve's quick check do not)
    import shutil
    import tempfile
    from pathlib import Path

    from ..tpm.swtpm import find_tool

    find_tool("swtpm")
    if _is_encrypted(layout) and state_key is None:
        return ProbeResult(True, "encrypted state: not dry-loaded (swtpm needs its key)", False)
    tpm2 = not _is_tpm12(layout)
    tmp = Path(tempfile.mkdtemp(prefix="vtpm-qcow-probe-", dir=staging_dir()))
    try:
        os.chmod(tmp, 0o700)
        state = tmp / "state.lin"
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(layout)
        return _dry_load(state, tmp / "run", tpm2=tpm2, timeout=timeout, state_key=state_key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dry_load(
    state: Path, workdir: Path, *, tpm2: bool, timeout: float, state_key: bytes | None = None
) -> ProbeResult:
    from ..tpm.client import SwtpmSocketTransport, Tpm
    from ..tpm.swtpm import Swtpm

    server = str(workdir / "data.sock")
    try:
        swtpm = Swtpm.start(
            f"backend-uri=file://{state}",
            workdir,
            server=server,
            tpm2=tpm2,
            flags=("not-need-init", "startup-clear"),
            timeout=timeout,
            state_key=state_key,
        )
    except SwtpmError as err:
        if "exited early" in str(err):
            return ProbeResult(False, f"swtpm exited: {_swtpm_says(workdir, str(err))}")
        raise
    try:
        try:
            with SwtpmSocketTransport(server, swtpm.ctrl, timeout=timeout) as transport:
                if tpm2:
                    Tpm(transport).get_random(16)
                else:
                    _tpm12_get_random(transport.transmit(_TPM12_GET_RANDOM))
        except TpmResponseError as err:
            if err.rc == TPM_RC_FAILURE:
                return ProbeResult(False, f"libtpms is in failure mode ({err}){_log(swtpm)}")
            return ProbeResult(False, f"the TPM refused {err}{_log(swtpm)}")
        except TpmError as err:
            if swtpm.proc.poll() is not None:
                return ProbeResult(False, f"swtpm exited: {_swtpm_says(workdir, str(err))}")
            return ProbeResult(False, f"swtpm did not answer: {err}{_log(swtpm)}")
        if swtpm.proc.poll() is not None:
            return ProbeResult(False, f"swtpm exited: {_swtpm_says(workdir, 'no reason given')}")
        return ProbeResult(True)
    finally:
        swtpm.stop()


def _tpm12_get_random(reply: bytes) -> None:
    """Raise TpmResponseError unless a TPM 1.2 response says success."""

    rc = struct.unpack_from(">I", reply, 6)[0] if len(reply) >= 10 else -1
    if rc != 0:
        raise TpmResponseError(0x46, TPM_RC_FAILURE if rc == TPM12_FAILEDSELFTEST else rc)


def _output_lines(workdir: Path) -> list[str]:
    """swtpm's non-empty log and stderr lines (as :meth:`Swtpm.start` directs them)."""
    lines = []
    for name in ("swtpm.log", "swtpm.stderr"):
        try:
            text = (workdir / name).read_text(errors="replace")
        except OSError:
            continue
        lines += [line.strip() for line in text.splitlines() if line.strip()]
    return lines


def _swtpm_says(workdir: Path, fallback: str) -> str:
    """One line: libtpms' own complaint (``libtpms/tpm2: Entering failure mode; ...``)
    followed by swtpm's last line, or ``fallback`` when swtpm said nothing."""
    lines = _output_lines(workdir)
    if not lines:
        return fallback
    first = next((line for line in lines if line.startswith("libtpms")), lines[-1])
    return first if first == lines[-1] else f"{first} ({lines[-1]})"


def _log(swtpm: Swtpm) -> str:
    """``: <what swtpm/libtpms logged>`` if anything (libtpms' reason for failure mode)."""
    lines = _output_lines(swtpm.log.parent)
    return f": {_swtpm_says(swtpm.log.parent, '')}" if lines else ""


__all__ = [
    "NO_STATE",
    "ProbeResult",
    "blob_problem",
    "layout_problem",
    "probe_layout",
]
