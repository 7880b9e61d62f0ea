"""``vtpm-qcow check`` / ``--repair``, ``info``'s "not loadable" and :mod:`vtpm_qcow.state.probe`,
on TPM states a real swtpm made and broken exactly the way issue 9's bug broke them.

The bug: the file view committed swtpm's store of a new state after swtpm's msync of only
the store's first page (the linear header and the start of the new permall), so the image
holds the new page 0 over the old state's other pages: clean to ``qemu-img check``, refused
by swtpm.  Here that is :meth:`Store.commit_linear` of a later state's first 4 KiB onto an
earlier state, imported with ``vtpm-qcow import``.  Two such tears:

* *shrunk*: state A has an NV index, B has it undefined (permall shrinks); libtpms fails in
  NvPowerOn: only a dry load sees it;
* *moved*: A has a volatile state section after permall, B's permall outgrew its section
  and moved behind it; the torn header points permall at old bytes without libtpms' magic:
  the structural checks (``info``) see it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import held_by_qemu_io, need
from tests.qcow2 import oracle
from tests.vm.qemu_fixtures import stop_process
from tests.vtpm.swtpm_fixtures import NV_INDEX, running_swtpm, setup_state, tpm_client
from vtpm_qcow.backup.plainstate import layout_from_file
from vtpm_qcow.errors import SwtpmError
from vtpm_qcow.state import linear
from vtpm_qcow.state.probe import NO_STATE, ProbeResult, layout_problem, probe_layout
from vtpm_qcow.state.store import Store, digest

PAGE = 4096
SECOND_NV_INDEX = NV_INDEX + 1
UNLOADABLE_TAG = re.compile(r"unloadable-\d{8}T\d{6}Z")


@dataclass(frozen=True)
class States:
    """Linear files made by a real swtpm_setup/swtpm, and their layouts."""

    base: Path  # swtpm_setup with EK and platform certificates
    nv: Path  # base + NV index NV_INDEX (2048 bytes)
    nv_undefined: Path  # nv with the index undefined again: permall shrinks
    volatile: Path  # base + a volatile state section after permall
    grown: Path  # volatile + two NV indices: permall outgrows its section and moves

    @staticmethod
    def layout(path: Path) -> bytes:
        return layout_from_file(path)


def _changed(source: Path, target: Path, workdir: Path, change: str) -> Path:
    """``target``: a copy of linear file ``source`` after a real swtpm made ``change``."""
    target.write_bytes(source.read_bytes())
    with (
        running_swtpm(f"backend-uri=file://{target}", workdir) as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        if change == "define":
            tpm.nv_define_space(NV_INDEX, 2048)
        elif change == "undefine":
            tpm.nv_undefine_space(NV_INDEX)
        elif change == "volatile":
            swtpm.store_volatile()
        elif change == "grow":
            tpm.nv_define_space(NV_INDEX, 2048)
            tpm.nv_define_space(SECOND_NV_INDEX, 1024)
    return target


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> States:
    tmp = tmp_path_factory.mktemp("states")
    base = tmp / "base.lin"
    setup_state(f"file://{base}", "--create-ek-cert", "--create-platform-cert")
    nv = _changed(base, tmp / "nv.lin", tmp / "run-nv", "define")
    volatile = _changed(base, tmp / "volatile.lin", tmp / "run-vol", "volatile")
    made = States(
        base=base,
        nv=nv,
        nv_undefined=_changed(nv, tmp / "nv-undefined.lin", tmp / "run-undef", "undefine"),
        volatile=volatile,
        grown=_changed(volatile, tmp / "grown.lin", tmp / "run-grow", "grow"),
    )
    # The tears below rely on these shapes of swtpm's layouts.
    assert linear.parse_header(made.layout(nv)).slot("permall").data_length > PAGE
    moved = linear.parse_header(made.layout(made.grown)).slot("permall").offset
    assert moved > linear.parse_header(made.layout(volatile)).slot("permall").offset
    return made


TEARS = {"shrunk": ("nv", "nv_undefined"), "moved": ("volatile", "grown")}


def vtpm(*args: str) -> subprocess.CompletedProcess[str]:
    """The real ``vtpm-qcow`` command."""
    return subprocess.run(
        [need("vtpm-qcow"), *args], capture_output=True, text=True, timeout=300, check=False
    )


def ok(*args: str, status: int = 0) -> str:
    """Run; expect ``status`` and no traceback; return stdout."""
    done = vtpm(*args)
    assert done.returncode == status, f"vtpm-qcow {' '.join(args)}: {done.stdout}{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def fails(*args: str, status: int = 1) -> str:
    """Run a failing command: exactly one line on stderr, no traceback; return it."""
    done = vtpm(*args)
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def line_of(output: str, prefix: str) -> str:
    """The one line of ``output`` starting with ``prefix``."""
    found = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, output
    return found[0]


def imported(tmp_path: Path, source: Path, name: str = "vtpm.qcow2") -> Path:
    image = tmp_path / name
    ok("create", str(image))
    ok("import", str(image), str(source))
    return image


def tear(image: Path, later: bytes, *, again: int = 0) -> bytes:
    """Commit only the first page of state ``later`` (the bug), ``again`` more times (each
    commit reuses the clusters the one before freed); returns the torn layout."""
    with Store.open(image) as store:
        for _ in range(1 + again):
            store.commit_linear([(0, later[:PAGE])])
        return store.layout()


def current_layout(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "exported.lin"
    out.unlink(missing_ok=True)
    ok("export", str(image), str(out))
    return layout_from_file(out)


def test_a_shrunk_permall_torn_at_page_0_only_a_dry_load_sees(
    states: States, tmp_path: Path
) -> None:
    image = imported(tmp_path, states.nv)
    torn = tear(image, States.layout(states.nv_undefined))
    oracle.assert_clean(image)
    # swtpm's structural checks pass: the first page is all B, consistently
    assert layout_problem(torn, source="torn") is None
    info = json.loads(ok("info", "--json", str(image)))
    assert info["loadable"] is True and info["problem"] is None
    assert "passes swtpm's structural checks" in ok("check", "--no-load", str(image))

    out = ok("check", str(image), status=2)
    state = line_of(out, "state:")
    assert state.startswith("state: not loadable: dry load: swtpm exited: libtpms/tpm2: ")
    assert line_of(out, "qcow2:") == "qcow2: no errors (as 'qemu-img check' counts them)"
    result = probe_layout(torn, source="torn")
    assert not result.loadable and result.dry_loaded
    assert result.reason is not None and "\n" not in result.reason
    assert "libtpms" in result.reason
    assert probe_layout(States.layout(states.nv), source="A") == ProbeResult(True)


def test_a_moved_permall_torn_at_page_0_is_not_loadable_in_info(
    states: States, tmp_path: Path
) -> None:
    image = imported(tmp_path, states.volatile)
    torn = tear(image, States.layout(states.grown))
    oracle.assert_clean(image)
    problem = layout_problem(torn, source="torn")
    assert problem is not None and problem.startswith("torn: permall: headerless blob")
    assert "TPM 2.0 magic" in problem

    text = ok("info", str(image))
    assert line_of(text, "state:").startswith(
        "state: not loadable: permall: headerless blob does not start with libtpms' TPM 2.0 magic"
    )
    assert "state digest:" not in text
    info = json.loads(ok("info", "--json", str(image)))
    assert info["loadable"] is False and "permall" in info["problem"]

    out = ok("check", "--no-load", str(image), status=2)
    assert line_of(out, "permall:").startswith("permall: ") and "magic" in out
    assert line_of(out, "state:").startswith("state: not loadable: permall: headerless blob")
    report = json.loads(ok("check", "--json", str(image), status=2))
    assert report["loadable"] is False and report["exit_status"] == 2
    assert "corruptions" not in report["qcow2"]  # qemu-img's JSON omits zero counts
    assert not report["damaged"] and report["repair"] is None


@pytest.mark.parametrize("kind", sorted(TEARS))
def test_repair_restores_the_previous_generation_from_freed_clusters(
    states: States, tmp_path: Path, kind: str
) -> None:
    earlier, later = (getattr(states, name) for name in TEARS[kind])
    image = imported(tmp_path, earlier)
    tear(image, States.layout(later))
    torn_digest = json.loads(ok("info", "--json", str(image)))["state_digest"]

    out = ok("check", "--repair", str(image))
    assert line_of(out, "repair: restored").startswith(
        "repair: restored the previous generation found in freed cluster 0x"
    )
    kept = line_of(out, "repair: kept")
    tag = re.search(r"'(unloadable-[^']+)'", kept)
    assert tag is not None and UNLOADABLE_TAG.fullmatch(tag.group(1)), kept
    assert line_of(out, "qcow2: no errors after")

    oracle.assert_clean(image)
    restored = current_layout(image, tmp_path)
    assert restored == States.layout(earlier)  # exactly the previous generation, A
    assert probe_layout(restored, source="restored").loadable
    if kind == "shrunk":
        lin = tmp_path / "restored.lin"
        lin.write_bytes(restored)
        with (
            running_swtpm(f"backend-uri=file://{lin}", tmp_path / "run") as swtpm,
            tpm_client(swtpm) as tpm,
        ):
            assert NV_INDEX in tpm.nv_indices()  # A's index, which B undefined
    # the refused state survives as the unloadable-* snapshot, as qemu-img sees it too
    info = json.loads(ok("info", "--json", str(image)))
    assert [s["tag"] for s in info["snapshots"]] == [tag.group(1)]
    assert info["snapshots"][0]["state_digest"] == torn_digest
    assert [s["name"] for s in oracle.snapshot_list(image)] == [tag.group(1)]
    assert line_of(ok("check", str(image)), "state:").startswith("state: loads")


def test_repair_falls_back_to_the_newest_snapshot_once_freed_clusters_are_reused(
    states: States, tmp_path: Path
) -> None:
    image = imported(tmp_path, states.base)
    ok("snapshot", "-c", "older", str(image))
    ok("import", str(image), str(states.volatile))
    ok("snapshot", "-c", "good", str(image))
    ok("import", str(image), str(states.nv))  # the current state: in no snapshot
    tear(image, States.layout(states.nv_undefined), again=3)  # A's clusters reused
    oracle.assert_clean(image)

    out = ok("check", "--repair", str(image))
    assert re.fullmatch(
        r"repair: restored snapshot 'good' \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)",
        line_of(out, "repair: restored"),
    ), out
    assert current_layout(image, tmp_path) == States.layout(states.volatile)
    oracle.assert_clean(image)
    tags = [s["name"] for s in oracle.snapshot_list(image)]
    assert tags[:2] == ["older", "good"] and len(tags) == 3
    assert UNLOADABLE_TAG.fullmatch(tags[2])


def test_repair_without_a_loadable_state_changes_nothing(states: States, tmp_path: Path) -> None:
    image = imported(tmp_path, states.nv)
    tear(image, States.layout(states.nv_undefined), again=3)
    before = image.read_bytes()
    out = ok("check", "--repair", str(image), status=2)
    assert line_of(out, "repair: no earlier state loads").endswith(f"{image} is unchanged")
    assert image.read_bytes() == before
    assert oracle.snapshot_list(image) == []


def test_repair_of_a_healthy_image_changes_nothing(states: States, tmp_path: Path) -> None:
    image = imported(tmp_path, states.nv)
    ok("snapshot", "-c", "s1", str(image))
    before = image.read_bytes()
    out = ok("check", "--repair", str(image))
    assert line_of(out, "state:").startswith("state: loads")
    assert line_of(out, "repair:") == "repair: nothing to do: the current state is not refused"
    assert image.read_bytes() == before

    fresh = tmp_path / "fresh.qcow2"
    ok("create", str(fresh))
    before = fresh.read_bytes()
    out = ok("check", "--repair", str(fresh))
    assert line_of(out, "state:").startswith("state: none (not set up yet")
    assert fresh.read_bytes() == before


def test_a_held_image_is_checked_with_u_and_never_repaired(states: States, tmp_path: Path) -> None:
    image = imported(tmp_path, states.nv)
    tear(image, States.layout(states.nv_undefined))
    with held_by_qemu_io(image):
        # QEMU's read-write open cleared the commit records' autoclear bit
        before = image.read_bytes()
        line = fails("check", "--repair", str(image))
        assert "locked by another process (QEMU" in line and "a repair" in line, line
        line = fails("check", str(image))
        assert "-U" in line and str(image) in line, line
        out = ok("check", "-U", str(image), status=2)
        assert line_of(out, "state:").startswith("state: not loadable: dry load")
        assert line_of(out, "note:").startswith("note: read shared (-U)")
        assert "-U" in fails("check", "-U", "--repair", str(image))
    assert image.read_bytes() == before


def test_bad_arguments_and_files_are_one_line(states: States, tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    assert fails("check", str(missing)) == f"vtpm-qcow: {missing}: no such file"
    assert fails("check", "--repair", str(missing)).startswith(f"vtpm-qcow: {missing}: no such")
    assert "required: IMAGE" in fails("check")
    assert "unrecognized arguments: --frobnicate" in fails("check", "--frobnicate", "x")
    image = imported(tmp_path, states.nv)
    assert "--no-load" in fails("check", "--repair", "--no-load", str(image))
    text = tmp_path / "not-an-image"
    text.write_text("hello\n")
    assert fails("check", str(text)).startswith("vtpm-qcow: ")
    assert fails("check", str(tmp_path)).startswith("vtpm-qcow: ")


def test_probe_refuses_what_swtpm_would_manufacture_and_cleans_up(
    states: States, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert probe_layout(b"", source="x") == ProbeResult(False, NO_STATE)
    assert layout_problem(b"", source="x") == f"x: {NO_STATE}"
    # a layout holding only a volatile state: swtpm would start a brand new TPM
    volatile = States.layout(states.volatile)
    blob = linear.read_section(volatile, "volatilestate")
    assert blob is not None
    update = linear.store_section(linear.empty_layout(), "volatilestate", blob)
    only_volatile = linear.apply_update(linear.empty_layout(), update)
    assert probe_layout(only_volatile, source="x") == ProbeResult(False, NO_STATE)
    assert layout_problem(only_volatile, source="x") == f"x: {NO_STATE}"

    # the private copy and swtpm's run directory are gone afterwards, swtpm too
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert probe_layout(States.layout(states.grown), source="x").loadable
    assert not list(tmp_path.glob("vtpm-qcow-probe-*"))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert str(tmp_path).encode() not in cmdline, cmdline

    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(SwtpmError, match=r"^swtpm: not found on PATH"):
        probe_layout(States.layout(states.nv), source="x")


def test_digest_of_a_repaired_state_is_the_earlier_one(states: States, tmp_path: Path) -> None:
    image = imported(tmp_path, states.volatile)
    with Store.open(image, writable=False) as store:
        wanted = store.state_digest()
        wanted_layout = digest(store.layout())
    tear(image, States.layout(states.grown))
    report = json.loads(ok("check", "--repair", "--json", str(image)))
    assert report["repair"]["done"] is True and report["repair"]["kind"] == "freed"
    assert report["exit_status"] == 0
    with Store.open(image, writable=False) as store:
        assert store.state_digest() == wanted and digest(store.layout()) == wanted_layout


def test_serve_refuses_a_state_swtpm_would_reject_with_the_reason(
    states: States, tmp_path: Path
) -> None:
    """serve runs check's quick part before starting swtpm: a torn permall is refused in
    one line naming the section, before anything is mounted or written; after --repair
    the same command serves."""
    image = imported(tmp_path, states.volatile)
    tear(image, States.layout(states.grown))
    before = image.read_bytes()
    sock = tmp_path / "swtpm.sock"
    refused = subprocess.Popen(
        [need("vtpm-qcow"), "serve", str(image), "--ctrl", str(sock), "--foreground"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = refused.communicate(timeout=60)
    finally:  # a serve that was not refused is stopped as a daemon is: it unmounts, ends swtpm
        stop_process(refused, grace=15)
    out = err.decode(errors="replace").strip()
    assert refused.returncode == 1 and len(out.splitlines()) == 1, (refused.returncode, out)
    assert "swtpm would not load this state" in out and "permall" in out, out
    assert "check --repair" in out
    assert image.read_bytes() == before
    assert not sock.exists()
    ok("check", "--repair", str(image), status=0)
    proc = subprocess.Popen(
        [need("vtpm-qcow"), "serve", str(image), "--ctrl", str(sock), "--foreground"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "serve did not start swtpm"
            time.sleep(0.05)
    finally:
        stop_process(proc, grace=15)
