"""``vtpm-qcow check``: is the image sound, and would swtpm load its current state?

Three levels, each a list of one-line :class:`Finding` s in a :class:`Report`:

1. the qcow2 image (:meth:`qcow2.Image.check`, counted as ``qemu-img check`` counts):
   corruptions and check errors make it *damaged*; leaks are only reported;
2. swtpm's linear header and every section's blob
   (:func:`vtpm_qcow.state.probe.layout_problem`, :func:`vtpm_qcow.state.probe.blob_problem`);
3. unless disabled, a dry load by a real swtpm (:func:`vtpm_qcow.state.probe.probe_layout`).

Nothing here writes; the repair is :mod:`vtpm_qcow.state.recover`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from qcow2.errors import Qcow2Error

from ..errors import StateFormatError
from . import linear
from .probe import NO_STATE, blob_problem, probe_layout
from .store import Store

#: Exit statuses of ``vtpm-qcow check`` (documented in its --help).
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_NOT_LOADABLE: Final = 2
EXIT_DAMAGED: Final = 3


@dataclass(frozen=True)
class Finding:
    """One line of the report: ``topic: text``; ``status`` is ok, note, leaks, damaged,
    not-loadable, unknown or none."""

    topic: str
    status: str
    text: str

    @property
    def line(self) -> str:
        """The finding as printed."""
        return f"{self.topic}: {self.text}"

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"topic": self.topic, "status": self.status, "text": self.text}


@dataclass
class Report:
    """What :func:`check_store` found."""

    image: str
    findings: list[Finding] = field(default_factory=list)
    #: qcow2 metadata corrupt, or the check could not complete.
    damaged: bool = False
    #: True: loads (dry load) or passes the structural checks (``dry_loaded`` False);
    #: False: swtpm would refuse it; None: no state at all, or unknown (encrypted).
    loadable: bool | None = None
    #: Why the state does not load (one line), when ``loadable`` is False.
    problem: str | None = None
    dry_loaded: bool = False
    #: The current linear layout (``b""``: none or unreadable).
    layout: bytes = b""
    qcow2: dict[str, Any] = field(default_factory=dict)

    def add(self, topic: str, status: str, text: str) -> None:
        """Append a finding."""
        self.findings.append(Finding(topic, status, text))

    @property
    def exit_status(self) -> int:
        """3 damaged, else 2 not loadable, else 0."""
        if self.damaged:
            return EXIT_DAMAGED
        if self.loadable is False:
            return EXIT_NOT_LOADABLE
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """JSON form (without the layout bytes)."""
        return {
            "image": self.image,
            "qcow2": self.qcow2,
            "damaged": self.damaged,
            "loadable": self.loadable,
            "problem": self.problem,
            "dry_loaded": self.dry_loaded,
            "findings": [f.to_dict() for f in self.findings],
            "exit_status": self.exit_status,
        }


def check_qcow2(store: Store, report: Report) -> None:
    """The qcow2 level: ``qemu-img check``'s counts, one finding."""
    result = store.image.check()
    report.qcow2 = {**result.to_json(), "messages": list(result.messages)}
    first = f"; first: {result.messages[0]}" if result.messages else ""
    if result.error is not None:
        report.damaged = True
        report.add("qcow2", "damaged", f"check failed: {result.error}")
    elif result.corruptions or result.check_errors:
        report.damaged = True
        report.add(
            "qcow2",
            "damaged",
            f"{result.corruptions} corruptions, {result.check_errors} check errors "
            f"('qemu-img check -r all' repairs the metadata){first}",
        )
    elif result.leaks:
        report.add(
            "qcow2",
            "leaks",
            f"{result.leaks} leaked clusters (space only, harmless; they may hold "
            "earlier states, which 'check --repair' looks at first)",
        )
    else:
        report.add("qcow2", "ok", "no errors (as 'qemu-img check' counts them)")


def check_state(
    store: Store,
    report: Report,
    *,
    load: bool,
    timeout: float = 20.0,
    state_key: bytes | None = None,
) -> None:
    """The linear header, every section's blob and (``load``) a dry load in swtpm."""
    source = store.path
    try:
        layout = store.layout()
    except StateFormatError as err:
        _not_loadable(report, "linear header", str(err).removeprefix(f"{source}: "))
        return
    report.layout = layout
    if not layout:
        report.add("linear header", "none", "none: the state file is not formatted")
        report.add("state", "none", "none (not set up yet: swtpm manufactures a TPM at start)")
        return
    header = linear.parse_header(layout, source=source)
    present = [n for n in linear.SECTION_NAMES if header.slot(n).allocated]
    if not present:
        report.add("linear header", "ok", f"version {header.version}, no sections")
        report.add("state", "none", "none (not set up yet: swtpm manufactures a TPM at start)")
        return
    report.add(
        "linear header",
        "ok",
        f"version {header.version}, sections {', '.join(present)}, ending at byte {header.end}",
    )
    problem = None
    if "permall" not in present:
        problem = f"permall: missing ({NO_STATE})"
        report.add("permall", "not-loadable", f"missing ({NO_STATE})")
    for name in present:
        slot = header.slot(name)
        found = blob_problem(layout[slot.offset : slot.offset + slot.data_length], name)
        where = f"{slot.data_length} bytes at {slot.offset}"
        if found is None:
            report.add(name, "ok", f"{where}: blob ok")
        else:
            problem = problem or found
            report.add(name, "not-loadable", f"{where}: {found.removeprefix(name + ': ')}")
    if problem is not None:
        report.loadable, report.problem = False, problem
        report.add("state", "not-loadable", f"not loadable: {problem}")
        return
    if not load:
        report.loadable = True
        report.add("state", "ok", "passes swtpm's structural checks (not dry-loaded: --no-load)")
        return
    result = probe_layout(layout, source=source, timeout=timeout, state_key=state_key)
    if not result.dry_loaded:
        report.add("state", "unknown", f"structural checks pass; {result.reason}")
        return
    report.dry_loaded = True
    if result.loadable:
        report.loadable = True
        report.add("state", "ok", "loads: a real swtpm started on it and answered GetRandom")
    else:
        _not_loadable(report, "state", f"dry load: {result.reason}")


def _not_loadable(report: Report, topic: str, reason: str) -> None:
    report.loadable, report.problem = False, reason
    text = f"not loadable: {reason}" if topic == "state" else reason
    report.add(topic, "not-loadable", text)
    if topic != "state":
        report.add("state", "not-loadable", f"not loadable: {reason}")


def check_store(
    store: Store, *, load: bool = True, timeout: float = 20.0, state_key: bytes | None = None
) -> Report:
    """Check ``store``'s image and current state (read-only); ``state_key``: the passphrase
    of swtpm's own state encryption, for the dry load."""
    report = Report(store.path)
    check_qcow2(store, report)
    try:
        check_state(store, report, load=load, timeout=timeout, state_key=state_key)
    except Qcow2Error as err:
        report.damaged = True
        report.add("state", "damaged", f"unreadable: {err}")
    return report


def repair(store: Store, report: Report) -> tuple[dict[str, Any], int]:
    """``check --repair`` after :func:`check_store` gave ``report`` on the writable
    ``store``: when the current state is refused, make the newest earlier state a real
    swtpm loads current (:mod:`vtpm_qcow.state.recover`).  Adds findings; returns the repair's
    JSON and the exit status.  A damaged image and a state that is not refused are left
    alone; so is the image when no earlier state loads.
    """
    from . import recover

    if report.damaged:
        report.add(
            "repair",
            "damaged",
            "not attempted: the qcow2 metadata is damaged; repair it first "
            "(qemu-img check -r all), then run check --repair again",
        )
        return {"done": False, "reason": "damaged"}, EXIT_DAMAGED
    if report.loadable is not False:
        report.add("repair", "ok", "nothing to do: the current state is not refused")
        return {"done": False, "reason": "nothing to repair"}, EXIT_OK
    winner, rejected = recover.find_loadable(store)
    for item in rejected:
        report.add("repair", "note", f"skipped {item.candidate.description}: {item.reason}")
    if winner is None:
        report.add(
            "repair",
            "not-loadable",
            f"no earlier state loads ({len(rejected)} candidates tried); {store.path} is unchanged",
        )
        return {"done": False, "reason": "nothing loads", "rejected": len(rejected)}, (
            EXIT_NOT_LOADABLE
        )
    kept = recover.restore(store, winner)
    report.add("repair", "ok", f"restored {winner.description}")
    report.add(
        "repair",
        "ok",
        f"kept the refused state as snapshot '{kept}' (reach it with 'vtpm-qcow backup "
        f"{'' if store.encrypted else '--format raw '}--snapshot {kept}' or 'snapshot -a')",
    )
    after = store.image.check()
    if after.exit_code == 0:
        report.add("qcow2", "ok", "no errors after the repair")
    elif after.exit_code == 3:
        report.add("qcow2", "leaks", f"{after.leaks} leaked clusters after the repair")
    else:
        report.add("qcow2", "damaged", f"after the repair: {after.corruptions} corruptions")
    restored = {
        "done": True,
        "restored": winner.description,
        "kind": winner.kind,
        "kept_as": kept,
        "rejected": len(rejected),
        "loads_now": True,  # a real swtpm loaded exactly these bytes before they went in
    }
    return restored, EXIT_OK if after.exit_code in (0, 3) else EXIT_DAMAGED


__all__ = [
    "EXIT_DAMAGED",
    "EXIT_ERROR",
    "EXIT_NOT_LOADABLE",
    "EXIT_OK",
    "Finding",
    "Report",
    "check_qcow2",
    "check_state",
    "check_store",
    "repair",
]
