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
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from . import linear
from .blob import (
    BLOB_FLAG_ENCRYPTED,
    TAG_DATA,
    TAG_ENCRYPTED_DATA,
    TAG_IVEC_ENCRYPTED_DATA,
    TPM2_PERMALL_MAGIC,
    BlobInfo,
    parse_blob,
    plain_payload,
)
from .errors import StateFormatError, SwtpmError
from .swtpm import Swtpm, find_tool

#: libtpms' TPM_RC_FAILURE: the TPM is in failure mode (its state did not unmarshal).
TPM_RC_FAILURE: Final = 0x101
#: TPM 1.2's TPM_FAILEDSELFTEST (a TPM 1.2 whose state did not load).
TPM12_FAILEDSELFTEST: Final = 0x1C
#: TPM 1.2 TPM_GetRandom(16): tag TPM_TAG_RQU_COMMAND, size 14, TPM_ORD_GetRandom.
_TPM12_GET_RANDOM: Final = struct.pack(">HIII", 0x00C1, 14, 0x46, 16)
NO_STATE: Final = "no TPM state: swtpm would manufacture a new TPM"


@dataclass(frozen=True)
class ProbeResult:
    """Whether swtpm loads a state; ``reason`` says why not (one line), else None.

    ``dry_loaded`` is False when the state could not be tried (an encrypted state needs
    swtpm's key): ``loadable`` is then True (nothing says otherwise) and ``reason`` says so.
    """

    loadable: bool
    reason: str | None = None
    dry_loaded: bool = True


def _blob_problem(data: bytes, name: str, *, tpm2: bool | None) -> str | None:
    """What swtpm/libtpms would refuse in the blob of section ``name``, or None.

    swtpm's CheckHeader takes data whose header does not check out (totlen != length,
    min_version > 2, too short) as a headerless version 1 blob and hands it to libtpms
    whole; a header that checks out must hold a DATA (or encrypted data) TLV that
    tlv_data_find_tag finds within the blob.
    """
    if not data:
        return f"{name}: empty blob"
    try:
        info: BlobInfo = parse_blob(data, source=name)
    except StateFormatError as err:
        return str(err)
    if info.header is None:
        payload = data
        where = "headerless blob"
    else:
        header = info.header
        if header.flags & BLOB_FLAG_ENCRYPTED:
            wanted = (TAG_ENCRYPTED_DATA, TAG_IVEC_ENCRYPTED_DATA)
            if not any(t.tag in wanted for t in info.tlvs):
                return f"{name}: encrypted blob without an encrypted-data TLV"
            return None  # the TPM's own bytes are opaque without the key
        data_tlvs = [t for t in info.tlvs if t.tag == TAG_DATA]
        if not data_tlvs:
            return f"{name}: blob (version {header.version}) has no data TLV"
        tlv = data_tlvs[0]
        payload = data[tlv.offset : tlv.offset + tlv.length]
        where = "data TLV"
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
    """True if a headerless payload may be a TPM 1.2 permall (libtpms 1.2 state starts
    with a TPM_PERMANENT_DATA tag and version); swtpm before 0.5 wrote such blobs."""
    return payload[2:4] == b"\x00\x22"


def layout_problem(layout: bytes, *, source: str, tpm2: bool | None = None) -> str | None:
    """Why swtpm would not load the linear ``layout`` (one line naming ``source`` and the
    section), or None when the checks swtpm makes before libtpms unmarshals pass.

    ``layout`` is the linear file's bytes up to the end of its last section (what
    :meth:`vtpm_qcow.store.Store.layout` returns; ``b""`` = not formatted).  ``tpm2``
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
        problem = _blob_problem(blob, name, tpm2=tpm2)
        if problem is not None:
            return f"{source}: {problem}"
    return None


def _is_encrypted(layout: bytes) -> bool:
    permall = linear.read_section(layout, "permall") or b""
    try:
        return parse_blob(permall).encrypted
    except StateFormatError:
        return False


def _is_tpm12(layout: bytes) -> bool:
    """True for a plain TPM 1.2 state (swtpm must then run without --tpm2)."""
    permall = linear.read_section(layout, "permall") or b""
    try:
        info = parse_blob(permall)
    except StateFormatError:
        return False
    payload = plain_payload(permall, info)
    return payload is not None and payload[2:6] != TPM2_PERMALL_MAGIC and _looks_tpm12(payload)


def probe_layout(layout: bytes, *, source: str, timeout: float = 20.0) -> ProbeResult:
    """Dry-load ``layout`` in a real swtpm and say whether the TPM works on it.

    The layout goes to a private temporary file (mode 0600, its directory removed
    afterwards); swtpm runs on it with ``--flags not-need-init,startup-clear`` and gets one
    GetRandom.  swtpm is always stopped.  A missing swtpm raises
    :class:`~vtpm_qcow.errors.SwtpmError`; so does a swtpm that neither answers nor exits
    within ``timeout`` seconds.  Layouts without a permall are not loadable without
    starting swtpm (it would manufacture a new TPM).
    """
    if not linear.is_formatted(layout):
        return ProbeResult(False, NO_STATE)
    try:
        header = linear.parse_header(layout, source=source)
    except StateFormatError as err:
        return ProbeResult(False, str(err))
    if not header.slot("permall").allocated:
        return ProbeResult(False, NO_STATE)
    find_tool("swtpm")
    if _is_encrypted(layout):
        return ProbeResult(True, "encrypted state: not dry-loaded (swtpm needs its key)", False)
    tpm2 = not _is_tpm12(layout)
    tmp = Path(tempfile.mkdtemp(prefix="vtpm-qcow-probe-"))
    try:
        os.chmod(tmp, 0o700)
        state = tmp / "state.lin"
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(layout)
        return _dry_load(state, tmp / "run", tpm2=tpm2, timeout=timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dry_load(state: Path, workdir: Path, *, tpm2: bool, timeout: float) -> ProbeResult:
    from .tpm import SwtpmSocketTransport, Tpm, TpmError, TpmResponseError

    server = str(workdir / "data.sock")
    try:
        swtpm = Swtpm.start(
            f"backend-uri=file://{state}",
            workdir,
            server=server,
            tpm2=tpm2,
            flags=("not-need-init", "startup-clear"),
            timeout=timeout,
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
    from .tpm import TpmResponseError

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
    "layout_problem",
    "probe_layout",
]
