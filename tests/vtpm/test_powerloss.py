"""Power loss and ``kill -9`` while a real swtpm stores its state through a mounted image.

The image lives on :mod:`tests.powerloss_fs`, a passthrough file system that records every
write, flush and truncate of it *below* the mount daemon, plus ``ack N`` markers the test
writes once swtpm's client got the answer to step N.  :mod:`tests.powerloss` rebuilds what
a power loss at any point of that recording may leave (writes before the last completed
flush durable, later ones lost, applied or torn per 512-byte sector, in any order).  Each
distinct crash image must:

* pass ``qemu-img check`` (exit 0, or 3 for leaked clusters only);
* open with :class:`vtpm_qcow.state.store.Store` and give a linear layout swtpm's checks accept;
* load in a real swtpm (not libtpms' failure mode) and show, through TPM commands, the
  state of the last step acknowledged before the crash or of the step then in flight, never
  an older one and never one that never existed (owner password, NV indices and their data,
  whether it resumes a saved or volatile state, and its snapshots, each loaded the same way).

Workloads: a TPM 2.0 manufactured by ``swtpm_setup`` with EK and platform certificates
(permall over one page), NV indices defined, written and undefined so the permall grows and
shrinks across 4 KiB pages and past its 8 KiB and 16 KiB sections (with the volatile state
behind it, so swtpm moves that down), swtpm's CMD_STORE_VOLATILE, CMD_INIT deleting the
volatile state, TPM2_Shutdown(STATE) and its resume, snapshots through the daemon; and a
TPM 1.2 with TPM_SaveState, the only writer of the savestate slot in swtpm 0.7.1 (libtpms'
TPM 2.0 keeps its saved state inside the permall).  Both views.

At most MAX_JUDGED distinct images per workload are judged (spread evenly over the run);
swtpm loads are cached by layout, so judging costs a few tens of milliseconds per image.

The ``kill -9`` tests make the daemon kill itself at each FSYNC of a short workload
(``VTPM_QCOW_TEST_KILL_AT_FSYNC``), i.e. between or during swtpm's msyncs: the image it
leaves is judged the same way, and the daemon must really die (its mount detachable with
``fusermount3 -u``, swtpm's pending msync failing rather than waiting forever).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import need, need_fuse, need_root
from tests.powerloss import (
    ALL_APPLIED,
    ALL_LOST,
    SECTOR,
    Distinct,
    Record,
    crash_image,
    crash_states,
    distinct_states,
    image_key,
    read_log,
    recording_fs,
    sample,
)
from tests.vtpm.mount_fixtures import (
    Mount,
    create_image,
    force_unmount,
    mounted,
    runtime_dir,  # noqa: F401  (fixture)
    start_mount,
    vtpm_qcow,
)
from tests.vtpm.swtpm_fixtures import need_swtpm, setup_state
from vtpm_qcow.errors import SwtpmError, TpmError, TpmResponseError, VtpmQcowError
from vtpm_qcow.export.control import RUNTIME_DIR_ENV
from vtpm_qcow.export.instruments import KILL_AT_FSYNC_ENV
from vtpm_qcow.state import linear
from vtpm_qcow.state.probe import NO_STATE, layout_problem
from vtpm_qcow.state.store import Store
from vtpm_qcow.tpm.client import TPM_SU_CLEAR, TPM_SU_STATE, SwtpmSocketTransport, Tpm
from vtpm_qcow.tpm.swtpm import Swtpm

pytestmark = pytest.mark.usefixtures("runtime_dir")

IMAGE = "vtpm.qcow2"
#: TCG NV index of the RSA EK certificate (swtpm_setup --create-ek-cert writes it).
EK_CERT_INDEX = 0x01C00002
#: A 1 KiB data index, and 2 KiB indices that grow the permall (about 2.1 KB each).
DATA_INDEX = 0x01500040
DATA_SIZE = 1024
GROW_INDICES = tuple(range(0x01500050, 0x01500055))
GROW_SIZE = 2048
OUR_INDICES = frozenset((DATA_INDEX, *GROW_INDICES))
OWNER_AUTHS = (b"", b"owner-1", b"owner-2")
#: libtpms' TPM_RC_FAILURE (failure mode), TPM_RC_INITIALIZE (already started: a volatile
#: state was loaded) and TPM_RC_NV_UNINITIALIZED (an index never written).
TPM_RC_FAILURE, TPM_RC_INITIALIZE, TPM_RC_NV_UNINITIALIZED = 0x101, 0x100, 0x14A
#: Crash states per crash point (all applied, all lost, random mixes), judged images per
#: workload at most, and the seed of the random mixes.
VARIANTS = 6
MAX_JUDGED = 150
SEED = 9
KILL_ENV = KILL_AT_FSYNC_ENV


def need_tools() -> None:
    """Everything these tests run: FUSE, root (swtpm_setup's certificates), swtpm, qemu-img."""
    need_fuse()
    need_root("swtpm_setup --create-ek-cert uses the system's local CA")
    need_swtpm()
    need("qemu-img")
    need("fusermount3")


# Section: what a TPM state shows


@dataclass(frozen=True)
class Tpm2State:
    """What a TPM 2.0 state shows through TPM commands (expected and observed alike)."""

    ek: bool = True
    owner_auth: bytes | None = b""
    nv: frozenset[int] = frozenset()
    #: digest of DATA_INDEX's content ("unwritten", or None: not defined)
    data: str | None = None
    #: how it starts: "volatile" (a stored volatile state resumes), "state" (resumes what
    #: TPM2_Shutdown(STATE) saved), "clear"
    startup: str = "clear"
    snapshots: tuple[tuple[str, TpmState], ...] = ()

    def with_snapshots(self, snapshots: tuple[tuple[str, TpmState], ...]) -> Tpm2State:
        """The same state with other snapshots."""
        return dataclasses.replace(self, snapshots=snapshots)


@dataclass(frozen=True)
class Tpm12State:
    """What a TPM 1.2 state shows: PCR 10 of the state TPM_SaveState saved (None: none)."""

    saved_pcr10: bytes | None = None
    snapshots: tuple[tuple[str, TpmState], ...] = ()

    def with_snapshots(self, snapshots: tuple[tuple[str, TpmState], ...]) -> Tpm12State:
        """The same state with other snapshots."""
        return dataclasses.replace(self, snapshots=snapshots)


TpmState = Tpm2State | Tpm12State


class NotLoadable(Exception):
    """swtpm does not load a state (one line saying why)."""


# Section: TPM 1.2 commands (only what the savestate workload needs)

TPM12_ORD_EXTEND, TPM12_ORD_PCR_READ, TPM12_ORD_SAVE_STATE, TPM12_ORD_STARTUP = (
    0x14,
    0x15,
    0x98,
    0x99,
)
TPM12_ST_CLEAR, TPM12_ST_STATE = 1, 2


def tpm12(transport: SwtpmSocketTransport, ordinal: int, params: bytes = b"") -> bytes:
    """One TPM 1.2 command without authorization; its output parameters."""
    reply = transport.transmit(struct.pack(">HII", 0x00C1, 10 + len(params), ordinal) + params)
    rc = struct.unpack_from(">I", reply, 6)[0]
    if rc:
        raise TpmResponseError(ordinal, rc)
    return reply[10:]


def tpm12_extend(transport: SwtpmSocketTransport, digest: bytes) -> bytes:
    """TPM_Extend of PCR 10; the new PCR value."""
    return tpm12(transport, TPM12_ORD_EXTEND, struct.pack(">I", 10) + digest)[:20]


# Section: loading a state in a real swtpm and looking at it


@contextlib.contextmanager
def swtpm_on(layout: bytes, *, tpm2: bool) -> Iterator[SwtpmSocketTransport]:
    """A real swtpm loading ``layout`` from a private file (no Startup sent yet)."""
    workdir = Path(tempfile.mkdtemp(prefix="pl-"))
    try:
        state = workdir / "state.lin"
        state.write_bytes(layout)
        server = str(workdir / "data.sock")
        try:
            swtpm = Swtpm.start(
                f"backend-uri=file://{state}",
                workdir / "run",
                server=server,
                tpm2=tpm2,
                flags=("not-need-init",),
            )
        except SwtpmError as err:
            raise NotLoadable(f"swtpm does not start: {err}") from err
        try:
            with SwtpmSocketTransport(server, swtpm.ctrl) as transport:
                yield transport
        finally:
            swtpm.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def tpm2_startup(tpm: Tpm) -> str:
    """Start a loaded TPM 2.0 and say how: "volatile", "state" or "clear"."""
    try:
        tpm.startup(TPM_SU_STATE)
        return "state"
    except TpmResponseError as err:
        if err.rc == TPM_RC_INITIALIZE:
            return "volatile"
        if err.rc == TPM_RC_FAILURE:
            raise
    tpm.startup(TPM_SU_CLEAR)
    return "clear"


def tpm2_owner_auth(tpm: Tpm) -> bytes | None:
    """Which of the workload's owner passwords the TPM takes (None: none of them)."""
    return next((auth for auth in OWNER_AUTHS if tpm.owner_auth_is(auth)), None)


def digest(data: bytes) -> str:
    """A short digest of NV data (for states that print in one line)."""
    return hashlib.sha256(data).hexdigest()[:12]


def tpm2_data(tpm: Tpm, nv: frozenset[int]) -> str | None:
    """The digest of DATA_INDEX's content: None if not defined, "unwritten" if never
    written."""
    if DATA_INDEX not in nv:
        return None
    try:
        return digest(tpm.nv_read(DATA_INDEX, DATA_SIZE))
    except TpmResponseError as err:
        if err.rc == TPM_RC_NV_UNINITIALIZED:
            return "unwritten"
        raise


def observe_tpm2(layout: bytes) -> Tpm2State:
    """Load a TPM 2.0 state in swtpm and read what it shows (NotLoadable if it does not)."""
    try:
        with swtpm_on(layout, tpm2=True) as transport:
            tpm = Tpm(transport)
            startup = tpm2_startup(tpm)
            tpm.get_random(8)
            indices = frozenset(tpm.nv_indices())
            nv = indices & OUR_INDICES
            return Tpm2State(
                ek=EK_CERT_INDEX in indices,
                owner_auth=tpm2_owner_auth(tpm),
                nv=nv,
                data=tpm2_data(tpm, nv),
                startup=startup,
            )
    except TpmResponseError as err:
        mode = "failure mode: " if err.rc == TPM_RC_FAILURE else ""
        raise NotLoadable(f"{mode}{err}") from err
    except TpmError as err:
        raise NotLoadable(f"swtpm does not answer: {err}") from err


def observe_tpm12(layout: bytes) -> Tpm12State:
    """Load a TPM 1.2 state in swtpm: resume its saved state if it has one, else start it."""
    saved = linear.read_section(layout, "savestate") is not None if layout else False
    try:
        with swtpm_on(layout, tpm2=False) as transport:
            if not saved:
                tpm12(transport, TPM12_ORD_STARTUP, struct.pack(">H", TPM12_ST_CLEAR))
                return Tpm12State()
            tpm12(transport, TPM12_ORD_STARTUP, struct.pack(">H", TPM12_ST_STATE))
            pcr = tpm12(transport, TPM12_ORD_PCR_READ, struct.pack(">I", 10))[:20]
            return Tpm12State(saved_pcr10=pcr)
    except TpmResponseError as err:
        raise NotLoadable(f"the TPM 1.2 refuses its state: {err}") from err
    except TpmError as err:
        raise NotLoadable(f"swtpm does not answer: {err}") from err


# Section: workloads


@dataclass
class Session:
    """A running workload: the mount, swtpm and a client on it, and the acknowledgements."""

    mount: Mount
    swtpm: Swtpm
    transport: SwtpmSocketTransport
    mark: Callable[[str], None]
    #: acks[i]: the state step i left, acknowledged to the client (acks[0]: after setup)
    acks: list[TpmState] = field(default_factory=list)
    #: a TPM 1.2's PCR 10 as the last TPM_Extend left it
    pcr10: bytes = bytes(20)

    @property
    def tpm(self) -> Tpm:
        """TPM 2.0 commands on the session's connection."""
        return Tpm(self.transport)

    def ack(self, state: TpmState) -> None:
        """Step ``len(acks)`` was answered: remember its state and mark the log."""
        self.acks.append(state)
        self.mark(f"ack {len(self.acks) - 1}")


#: A step: run one state-changing operation, return the state it leaves.  Its __name__
#: names it in messages.
Step = Callable[[Session, TpmState], TpmState]


def named(name: str) -> Callable[[Step], Step]:
    """Give a step made by a factory a name that says what it does."""

    def rename(step: Step) -> Step:
        step.__name__ = name
        return step

    return rename


def change_auth(new: bytes) -> Step:
    """TPM2_HierarchyChangeAuth of the owner to ``new``."""

    @named(f"HierarchyChangeAuth({new.decode()})")
    def step(s: Session, state: TpmState) -> TpmState:
        assert isinstance(state, Tpm2State)
        s.tpm.hierarchy_change_auth(new, owner_auth=state.owner_auth or b"")
        return dataclasses.replace(state, owner_auth=new)

    return step


def define(index: int, size: int) -> Step:
    """TPM2_NV_DefineSpace of ``index``."""

    @named(f"NV_DefineSpace({index:#x}, {size})")
    def step(s: Session, state: TpmState) -> TpmState:
        assert isinstance(state, Tpm2State)
        s.tpm.nv_define_space(index, size, owner_auth=state.owner_auth or b"")
        data = "unwritten" if index == DATA_INDEX else state.data
        return dataclasses.replace(state, nv=state.nv | {index}, data=data)

    return step


def undefine(index: int) -> Step:
    """TPM2_NV_UndefineSpace of ``index``."""

    @named(f"NV_UndefineSpace({index:#x})")
    def step(s: Session, state: TpmState) -> TpmState:
        assert isinstance(state, Tpm2State)
        s.tpm.nv_undefine_space(index, owner_auth=state.owner_auth or b"")
        data = None if index == DATA_INDEX else state.data
        return dataclasses.replace(state, nv=state.nv - {index}, data=data)

    return step


def write_data(seed: int) -> Step:
    """TPM2_NV_Write of 1 KiB into DATA_INDEX."""
    data = hashlib.shake_256(f"data {seed}".encode()).digest(DATA_SIZE)

    @named(f"NV_Write(data {seed})")
    def step(s: Session, state: TpmState) -> TpmState:
        assert isinstance(state, Tpm2State)
        s.tpm.nv_write(DATA_INDEX, data)
        return dataclasses.replace(state, data=digest(data))

    return step


def store_volatile(s: Session, state: TpmState) -> TpmState:
    """swtpm's CMD_STORE_VOLATILE: a volatile state section the next start resumes."""
    assert isinstance(state, Tpm2State)
    s.swtpm.store_volatile()
    return dataclasses.replace(state, startup="volatile")


def init_deleting_volatile(s: Session, state: TpmState) -> TpmState:
    """CMD_INIT with PTM_INIT_FLAG_DELETE_VOLATILE: swtpm resumes the volatile state, then
    deletes it from the store (the TPM stays started: no Startup needed)."""
    assert isinstance(state, Tpm2State)
    s.swtpm.init(delete_volatile=True)
    return dataclasses.replace(state, startup="clear")


def shutdown_state(s: Session, state: TpmState) -> TpmState:
    """TPM2_Shutdown(STATE): libtpms saves the state to resume into the permall."""
    assert isinstance(state, Tpm2State)
    s.tpm.shutdown(TPM_SU_STATE)
    return dataclasses.replace(state, startup="state")


def init_and_resume(s: Session, state: TpmState) -> TpmState:
    """CMD_INIT, then TPM2_Startup(STATE) resumes what Shutdown(STATE) saved."""
    assert isinstance(state, Tpm2State)
    s.swtpm.init()
    s.tpm.startup(TPM_SU_STATE)
    return dataclasses.replace(state, startup="clear")


def snapshot(tag: str) -> Step:
    """``vtpm-qcow snapshot -c TAG IMAGE`` while mounted: the daemon takes it."""

    @named(f"snapshot -c {tag}")
    def step(s: Session, state: TpmState) -> TpmState:
        vtpm_qcow("snapshot", "-c", tag, str(s.mount.image))
        return state.with_snapshots((*state.snapshots, (tag, state.with_snapshots(()))))

    return step


def tpm2_steps() -> list[Step]:
    """The TPM 2.0 workload (permall sizes are for swtpm_setup's EK and platform certs)."""
    return [
        change_auth(b"owner-1"),
        define(DATA_INDEX, DATA_SIZE),  # 6.0 -> 7.1 KB: into the second page
        write_data(1),
        store_volatile,  # volatile section after the permall's 8 KiB section
        define(GROW_INDICES[0], GROW_SIZE),  # 9.1 KB: past 8 KiB, the volatile state moves
        write_data(2),
        define(GROW_INDICES[1], GROW_SIZE),  # 11.2 KB
        define(GROW_INDICES[2], GROW_SIZE),  # 13.3 KB: into the fourth page
        snapshot("grown"),
        define(GROW_INDICES[3], GROW_SIZE),  # 15.4 KB
        define(GROW_INDICES[4], GROW_SIZE),  # 17.5 KB: past 16 KiB
        store_volatile,  # in place this time
        change_auth(b"owner-2"),
        undefine(GROW_INDICES[4]),  # back under 16 KiB
        undefine(GROW_INDICES[3]),
        undefine(GROW_INDICES[2]),
        undefine(GROW_INDICES[1]),
        undefine(GROW_INDICES[0]),  # back under 8 KiB (the section stays 32 KiB)
        init_deleting_volatile,
        write_data(3),
        shutdown_state,
        init_and_resume,
        snapshot("resumed"),
        write_data(4),
    ]


def tpm12_startup(s: Session, state: TpmState) -> TpmState:
    """TPM_Startup(ST_CLEAR) of a TPM 1.2."""
    tpm12(s.transport, TPM12_ORD_STARTUP, struct.pack(">H", TPM12_ST_CLEAR))
    s.pcr10 = bytes(20)
    return Tpm12State()


def tpm12_extend_step(digest: bytes) -> Step:
    """TPM_Extend of PCR 10: any command after TPM_SaveState deletes the saved state."""

    @named(f"TPM_Extend(PCR 10, {digest[:1].decode()})")
    def step(s: Session, state: TpmState) -> TpmState:
        s.pcr10 = tpm12_extend(s.transport, digest)
        return Tpm12State(saved_pcr10=None, snapshots=state.snapshots)

    return step


def tpm12_save_state(s: Session, state: TpmState) -> TpmState:
    """TPM_SaveState: the savestate section (holding PCR 10 as it is now)."""
    tpm12(s.transport, TPM12_ORD_SAVE_STATE)
    return Tpm12State(saved_pcr10=s.pcr10, snapshots=state.snapshots)


def tpm12_steps() -> list[Step]:
    """The TPM 1.2 savestate workload: save, drop, save again, snapshot the saved state."""
    return [
        tpm12_startup,
        tpm12_extend_step(b"1" * 20),
        tpm12_save_state,  # a savestate section after the permall
        tpm12_extend_step(b"2" * 20),  # swtpm deletes the savestate section
        tpm12_save_state,
        snapshot("saved"),
    ]


@dataclass(frozen=True)
class Workload:
    """A workload: TPM version, how its state is made and its steps."""

    name: str
    tpm2: bool
    steps: Callable[[], list[Step]]

    def initial(self) -> TpmState:
        """The state after set-up (acknowledged as step 0)."""
        return Tpm2State() if self.tpm2 else Tpm12State()

    def observe(self, layout: bytes) -> TpmState:
        """What a loaded ``layout`` shows."""
        return observe_tpm2(layout) if self.tpm2 else observe_tpm12(layout)


TPM2 = Workload("tpm2", True, tpm2_steps)
TPM12 = Workload("tpm12-savestate", False, tpm12_steps)


def set_up(mount: Mount, workload: Workload) -> None:
    """swtpm_setup with EK and platform certificates (TPM 2.0); nothing for the TPM 1.2,
    which swtpm manufactures at its first start."""
    if workload.tpm2:
        setup_state(mount.setup_tpmstate, "--create-ek-cert", "--create-platform-cert")


def step_names(steps: list[Step]) -> list[str]:
    """What the acknowledgements of a workload stand for: the set-up, then each step."""
    return ["set-up", *(step.__name__ for step in steps)]


def run_steps(s: Session, steps: list[Step]) -> None:
    """Run ``steps`` in order, acknowledging each."""
    for step in steps:
        s.ack(step(s, s.acks[-1]))


@contextlib.contextmanager
def session(mount: Mount, workload: Workload, mark: Callable[[str], None]) -> Iterator[Session]:
    """swtpm on ``mount`` with a client, for the ``with`` block (swtpm always stopped)."""
    flags = ("not-need-init", "startup-clear") if workload.tpm2 else ("not-need-init",)
    workdir = Path(tempfile.mkdtemp(prefix="pl-"))  # short: unix socket paths
    try:
        server = str(workdir / "data.sock")
        swtpm = Swtpm.start(mount.tpmstate, workdir, server=server, tpm2=workload.tpm2, flags=flags)
        try:
            with SwtpmSocketTransport(server, swtpm.ctrl) as transport:
                yield Session(mount, swtpm, transport, mark)
        finally:
            swtpm.stop(timeout=5)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# Section: judging crash images


@dataclass
class Judge:
    """Judges crash images of one workload against its acknowledged states."""

    workload: Workload
    acks: list[TpmState]
    #: names[i]: what step i did (names[0]: the set-up)
    names: list[str]
    #: what each distinct layout loads as (a TpmState, or why it does not load)
    loaded: dict[str, TpmState | str] = field(default_factory=dict)
    swtpm_loads: int = 0

    def allowed(self, mark: str | None) -> list[TpmState] | None:
        """States a crash after ``mark`` may show: the acknowledged one and the one in
        flight (None: before the first acknowledgement, any state that loads)."""
        if mark is None:
            return None
        number = int(mark.removeprefix("ack "))
        return self.acks[number : number + 2]

    def load(self, layout: bytes, source: str) -> TpmState | str:
        """What ``layout`` loads as (cached by content)."""
        key = hashlib.sha256(layout).hexdigest()
        if key not in self.loaded:
            problem = layout_problem(layout, source=source, tpm2=self.workload.tpm2)
            if problem is not None and not problem.endswith(NO_STATE):
                self.loaded[key] = problem
            else:
                self.swtpm_loads += 1
                try:
                    self.loaded[key] = self.workload.observe(layout)
                except NotLoadable as err:
                    self.loaded[key] = f"{source}: {err}"
        return self.loaded[key]

    def state_of(self, image: Path) -> TpmState | str:
        """The state an image holds, snapshots included, or what is wrong with it."""
        check = subprocess.run(
            [need("qemu-img"), "check", str(image)], capture_output=True, text=True, check=False
        )
        if check.returncode not in (0, 3):
            return f"qemu-img check exit {check.returncode}: {check.stdout}{check.stderr}".strip()
        try:
            with Store.open(image, writable=False) as store:
                layout = store.layout()
                store.sections()
                snapshots = [(s.tag, snapshot_layout(store, s.tag)) for s in store.snapshots()]
        except VtpmQcowError as err:
            return f"Store.open: {err}"
        live = self.load(layout, "live state")
        if isinstance(live, str):
            return live
        taken = []
        for tag, snap_layout in snapshots:
            loaded = self.load(snap_layout, f"snapshot {tag}")
            if isinstance(loaded, str):
                return loaded
            taken.append((tag, loaded))
        return live.with_snapshots(tuple(taken))

    def verdict(self, image: Path, marks: set[str | None]) -> str | None:
        """None if the image is a state the crash may leave after each of ``marks``, else
        what is wrong."""
        state = self.state_of(image)
        if isinstance(state, str):
            return state
        for mark in sorted(marks, key=lambda m: -1 if m is None else int(m.split()[1])):
            allowed = self.allowed(mark)
            if allowed is not None and state not in allowed:
                return f"{self.when(mark)}: shows {self.which(state)}"
        return None

    def when(self, mark: str | None) -> str:
        """The crash's place in the workload: the last acknowledged step and the next."""
        if mark is None:
            return "during the set-up"
        number = int(mark.removeprefix("ack "))
        later = self.names[number + 1 : number + 2] or ["nothing"]
        return f"after ack {number} ({self.names[number]}), in flight {later[0]}"

    def which(self, state: TpmState) -> str:
        """Name a state by the acknowledgements that left it."""
        acks = [i for i, ack in enumerate(self.acks) if ack == state]
        return f"the state of ack {acks}" if acks else f"a state that never existed: {state}"


def snapshot_layout(store: Store, tag: str) -> bytes:
    """Snapshot ``tag``'s linear layout (b"" if unformatted)."""
    view = store.image.snapshot(tag)
    head = bytes(view.read(0, linear.HEADER_SIZE))
    if not linear.is_formatted(head):
        return b""
    end = linear.parse_header(head, size=store.linear_size, source=tag).end
    return bytes(view.read(0, end))


# Section: the power-loss test


@dataclass
class Recording:
    """A recorded workload: the image before it, the log, the acknowledged states."""

    base: bytes
    records: list[Record]
    acks: list[TpmState]


def record_workload(workdir: Path, view: str, workload: Workload) -> Recording:
    """Run ``workload`` on ``view`` with the image on the recording file system."""
    backing = workdir / "backing"
    backing.mkdir(parents=True)
    create_image(backing / IMAGE)
    base = (backing / IMAGE).read_bytes()
    log = workdir / "writes.log"
    acks: list[TpmState] = []
    with (
        recording_fs(backing, workdir / "rec", log) as rec,
        mounted(rec.mountpoint / IMAGE, workdir / "mnt", view=view) as mount,
    ):
        set_up(mount, workload)
        acks.append(workload.initial())
        rec.mark("ack 0")
        with session(mount, workload, rec.mark) as s:
            s.acks = acks
            run_steps(s, workload.steps())
    records = read_log(log)
    assert not [r for r in records if r.name == IMAGE and r.kind in "UR"], "image renamed"
    # the log is complete: replaying all of it gives the image the run left
    replayed = crash_image(base, records, IMAGE, len(records), ALL_APPLIED).image
    assert replayed == (backing / IMAGE).read_bytes(), "the recording missed changes"
    # the judge sees in the image the run left exactly what the workload expects
    final = Judge(workload, acks, step_names(workload.steps())).state_of(backing / IMAGE)
    assert final == acks[-1], f"the image after the run shows {final}, expected {acks[-1]}"
    return Recording(base, records, acks)


def judge_recording(workdir: Path, view: str, workload: Workload, rec: Recording) -> list[str]:
    """Judge up to MAX_JUDGED distinct crash images; the failures, one line each."""
    judge = Judge(workload, rec.acks, step_names(workload.steps()))
    states = crash_states(rec.base, rec.records, IMAGE, variants=VARIANTS, seed=SEED)
    distinct = distinct_states(states)
    keys = sample(list(distinct), MAX_JUDGED)
    image = workdir / "crash.qcow2"
    failures = []
    for key in keys:
        entry: Distinct = distinct[key]
        state = crash_image(rec.base, rec.records, IMAGE, entry.point, entry.variant, seed=SEED)
        assert image_key(state.image) == key, "crash image rebuilt differently"
        image.write_bytes(state.image)
        problem = judge.verdict(image, entry.marks)
        if problem is not None:
            record = rec.records[entry.point - 1] if entry.point else None
            failures.append(
                f"{view}/{workload.name}: crash after record {entry.point} ({describe(record)};"
                f" writes since the last flush: {entry.fate}; marks {sorted(map(str, entry.marks))}"
                f"): {problem}"
            )
    print(
        f"{view}/{workload.name}: {len(rec.records)} records, {len(distinct)} distinct crash"
        f" images, {len(keys)} judged, {judge.swtpm_loads} swtpm loads, {len(failures)} failed"
    )
    return failures


def describe(record: Record | None) -> str:
    """A log record in a few words."""
    if record is None:
        return "before the first record"
    if record.kind == "M":
        return f"marker {record.data.decode(errors='replace')!r}"
    return f"{record.kind} {record.name} @{record.offset:#x}+{len(record.data)}"


def test_crash_states_keep_flushed_writes_and_vary_the_rest() -> None:
    """The crash model itself, on a made-up log (no FUSE, no swtpm)."""
    base = bytes(4096)
    first, second = b"A" * 1024, b"B" * 1536
    records = [
        Record("W", IMAGE, 0, first),
        Record("W", "other", 0, b"x"),
        Record("F", IMAGE),
        Record("M", "", 0, b"ack 0"),
        Record("W", IMAGE, 1024, second),
        Record("T", IMAGE, 3000),
        Record("M", "", 0, b"ack 1"),
    ]
    states = list(crash_states(base, records, IMAGE, variants=VARIANTS, seed=SEED))
    assert len(states) == (len(records) + 1) * VARIANTS
    for state in states:
        assert state == crash_image(base, records, IMAGE, state.point, state.variant, seed=SEED)
        if state.point >= 3:  # flushed: always there
            assert state.image[:1024] == first
        if state.variant == ALL_LOST:
            assert state.image == (base if state.point < 3 else first + base[1024:])
        for offset in range(0, len(state.image), SECTOR):  # a sector is old or new, whole
            assert len(set(state.image[offset : offset + SECTOR])) == 1
    last = [s for s in states if s.point == len(records)]
    assert [s.mark for s in last] == ["ack 1"] * VARIANTS
    assert last[ALL_APPLIED].image == first + second + bytes(3000 - 2560)
    assert len({s.image for s in last}) > 2, "random fates should differ"


@pytest.mark.parametrize("view", ["file", "dir"])
@pytest.mark.parametrize("workload", [TPM2, TPM12], ids=lambda w: w.name)
def test_power_loss_leaves_an_acknowledged_state_swtpm_loads(
    tmp_path: Path, view: str, workload: Workload
) -> None:
    need_tools()
    start = time.monotonic()
    recording = record_workload(tmp_path, view, workload)
    failures = judge_recording(tmp_path, view, workload, recording)
    print(f"{view}/{workload.name}: {time.monotonic() - start:.1f} s")
    assert not failures, f"{len(failures)} bad crash states:\n" + "\n".join(failures[:20])


# Section: kill -9 of the daemon between swtpm's msyncs

#: A short workload with every kind of file view store: in place, a new section, a
#: permall outgrowing its section with the volatile state behind it.
KILL_STEPS: list[Step] = [
    change_auth(b"owner-1"),
    define(DATA_INDEX, DATA_SIZE),
    write_data(1),
    store_volatile,
    define(GROW_INDICES[0], GROW_SIZE),
    write_data(2),
]


def manufactured_image(workdir: Path) -> Path:
    """An image holding a TPM 2.0 just out of swtpm_setup (with certificates)."""
    image = create_image(workdir / "base.qcow2")
    with mounted(image, workdir / "mnt-setup", view="file") as mount:
        set_up(mount, TPM2)
    return image


def _task_state(stat_path: str) -> str:
    """The state letter in a /proc stat file ("" if the task is gone)."""
    try:
        return Path(stat_path).read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def live_threads(pid: int) -> list[str]:
    """The threads of process ``pid`` that have not exited yet, each as "thread TID in
    STATE at WCHAN" (empty once it is dead; a zombie is dead: reaping it is not ours)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out = []
    for tid in tids:
        state = _task_state(f"/proc/{pid}/task/{tid}/stat")
        if state and state not in "ZX":
            with contextlib.suppress(OSError):
                where = Path(f"/proc/{pid}/task/{tid}/wchan").read_text() or "?"
                out.append(f"thread {tid} in state {state} at {where}")
    return out


def dead(pid: int, timeout: float = 10.0) -> bool:
    """Wait until every thread of process ``pid`` has exited."""
    deadline = time.monotonic() + timeout
    while live_threads(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class DeathWatch(threading.Thread):
    """Watches a mount daemon that is to kill itself.

    Once its main thread is gone, every other thread must follow within GRACE seconds.  One
    that cannot (it waits in the kernel for a FUSE request only the dead daemon could
    answer) keeps the FUSE connection alive, and swtpm hangs unkillable in msync: then the
    watch aborts the connection (``umount -f``) so that nothing hangs, and remembers the
    threads in :attr:`stuck`.
    """

    GRACE = 5.0

    def __init__(self, pid: int, mountpoint: Path) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.mountpoint = mountpoint
        self.done = threading.Event()
        self.stuck: list[str] = []

    def run(self) -> None:
        """Wait for the kill, then for the death; abort the connection if it does not come."""
        while _task_state(f"/proc/{self.pid}/stat") not in ("", "Z", "X"):
            if self.done.wait(0.02):
                return
        if dead(self.pid, self.GRACE):
            return
        self.stuck = live_threads(self.pid)
        subprocess.run(["umount", "-f", str(self.mountpoint)], capture_output=True, check=False)

    def finish(self) -> None:
        """Stop watching (waits for an abort in progress)."""
        self.done.set()
        self.join(30)


def stop_daemon(mount: Mount) -> None:
    """End a mount daemon if it still runs (SIGTERM, then SIGKILL) and detach its mount."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if dead(mount.pid, 0):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(mount.pid, sig)
        if dead(mount.pid, 20):
            break
    force_unmount(mount.mountpoint)


@dataclass
class KillRun:
    """What one run of KILL_STEPS did."""

    acks: list[TpmState]
    #: the error that ended the run (None: it ran to the end)
    failure: str | None = None
    #: FSYNC requests the daemon served (runs without a kill)
    fsyncs: int = 0
    #: threads of the killed daemon that could not exit (see DeathWatch)
    stuck: list[str] = field(default_factory=list)


def run_kill_steps(image: Path, mountpoint: Path, kill_at: int | None) -> KillRun:
    """Run KILL_STEPS on a file view mount of ``image``, the daemon killing itself at its
    FSYNC number ``kill_at``; a killed daemon's mount is detached with ``fusermount3 -u``."""
    run = KillRun([TPM2.initial()])
    env = {KILL_ENV: str(kill_at)} if kill_at is not None else None
    mount = start_mount(image, mountpoint, view="file", env=env)
    watch = DeathWatch(mount.pid, mountpoint)
    if kill_at is not None:
        watch.start()
    try:
        try:
            with session(mount, TPM2, lambda _: None) as s:
                s.acks = run.acks
                run_steps(s, KILL_STEPS)
                if kill_at is None:
                    with mount.control() as control:
                        run.fsyncs = int(control.info()["requests"]["fsync"])
        except (TpmError, SwtpmError) as err:
            run.failure = f"{type(err).__name__}: {err}"
        if kill_at is not None:
            assert dead(mount.pid, 2 * DeathWatch.GRACE), f"{KILL_ENV}={kill_at}: not killed"
            watch.finish()
            run.stuck = watch.stuck
            done = subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
            assert done.returncode == 0 or run.stuck, f"fusermount3 -u {mountpoint} failed"
    finally:
        watch.done.set()
        stop_daemon(mount)
    return run


@dataclass
class KillResults:
    """Every kill run of the kill -9 tests: ``runs[n]`` killed the daemon at FSYNC n and
    left an image with ``problems[n]`` (None: a state the kill may leave)."""

    fsyncs: int
    runs: dict[int, KillRun]
    problems: dict[int, str | None]


@pytest.fixture(scope="module")
def kill_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillResults]:
    """KILL_STEPS run once without a kill (counting the daemon's FSYNCs), then once per
    FSYNC with the daemon killing itself there; each image left is judged."""
    need_tools()
    workdir = tmp_path_factory.mktemp("kill")
    runtime = Path(tempfile.mkdtemp(prefix="vq-"))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(RUNTIME_DIR_ENV, str(runtime))
            yield kill_every_fsync(workdir)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def kill_every_fsync(workdir: Path) -> KillResults:
    """The runs of :func:`kill_results`."""
    start = time.monotonic()
    base = manufactured_image(workdir)
    dry = workdir / "dry.qcow2"
    shutil.copyfile(base, dry)
    dry_run = run_kill_steps(dry, workdir / "mnt-dry", None)
    expected, fsyncs = dry_run.acks, dry_run.fsyncs
    assert dry_run.failure is None and len(expected) == len(KILL_STEPS) + 1, dry_run.failure
    assert fsyncs > len(KILL_STEPS), f"only {fsyncs} fsyncs: is this the file view?"
    judge = Judge(TPM2, expected, step_names(KILL_STEPS))
    assert judge.state_of(dry) == expected[-1]
    results = KillResults(fsyncs, {}, {})
    for n in range(1, fsyncs + 1):
        image = workdir / f"kill{n}.qcow2"
        shutil.copyfile(base, image)
        run = results.runs[n] = run_kill_steps(image, workdir / f"mnt{n}", n)
        assert run.failure is not None, f"{KILL_ENV}={n}: the workload did not notice the kill"
        assert run.acks == expected[: len(run.acks)]
        mark = f"ack {len(run.acks) - 1}"
        problem = results.problems[n] = judge.verdict(image, {mark})
        print(f"{KILL_ENV}={n}: {judge.when(mark)} failed ({run.failure}); {problem or 'fine'}")
        image.unlink()
    print(f"kill -9 at each of {fsyncs} fsyncs: {time.monotonic() - start:.1f} s")
    return results


def test_kill_9_of_the_daemon_at_every_fsync_leaves_an_acknowledged_state(
    kill_results: KillResults,
) -> None:
    failures = [
        f"{KILL_ENV}={n} ({kill_results.runs[n].failure}): {problem}"
        for n, problem in kill_results.problems.items()
        if problem is not None
    ]
    assert not failures, "\n".join(failures)


def test_a_daemon_killed_at_any_fsync_dies_and_frees_its_mount(
    kill_results: KillResults,
) -> None:
    """A killed daemon must die at once, so its mount can be detached (fusermount3 -u) and
    swtpm's pending request fails instead of waiting for an answer forever."""
    failures = [
        f"{KILL_ENV}={n}: the killed daemon could not exit ({'; '.join(run.stuck)}), so its"
        " FUSE connection stayed up and swtpm's msync waited on it until the test aborted"
        " the connection with umount -f"
        for n, run in kill_results.runs.items()
        if run.stuck
    ]
    assert not failures, "\n".join(failures)
