"""``vtpm-qcow libvirt install|enable|disable|status``: opting domains in and out.

* :func:`install_hook` puts the hook script (``qemu.d/vtpm-qcow``) where libvirtd looks
  for it; libvirtd discovers hooks when it starts, so it must be restarted once.
* :func:`enable` moves a shut-off domain's TPM into a vTPM image (its existing libvirt
  state imported, else a TPM manufactured with the flags libvirt's own swtpm_setup uses)
  and records the image in the domain's ``<metadata>``: the hook acts on that domain from
  its next start.  libvirt's plain state directory is kept beside, renamed.
* :func:`disable` writes the image's current state back as a plain libvirt state
  directory and removes the opt-in; the image and its snapshots stay.
* :func:`status` says per domain what is enabled, running, mounted and followed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LibvirtError
from . import METADATA_PREFIX, METADATA_URI
from .domain import DomainInfo, libvirt_api, metadata_xml, parse_domain
from .hook import STATE_ROOT, SWTPM_USER, _pid, follower_pid_file, run, self_command, state_dir
from .offline import record

#: Where libvirtd looks for hooks.
HOOKS_DIR = Path("/etc/libvirt/hooks")
HOOK_NAME = "vtpm-qcow"
#: swtpm_setup's options as libvirt 9.0 passes them on a domain's first start.
LIBVIRT_SETUP_OPTIONS = ("--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram")
#: What the plain state directory is renamed to when its state moves into an image.
KEPT_SUFFIX = ".before-vtpm-qcow"


def hook_path(hooks_dir: Path = HOOKS_DIR) -> Path:
    return hooks_dir / "qemu.d" / HOOK_NAME


def hook_script() -> str:
    command = " ".join(shlex.quote(part) for part in self_command())
    return (
        "#!/bin/sh\n"
        "# vtpm-qcow's libvirt hook ('vtpm-qcow libvirt install'): it acts only on domains\n"
        "# opted in with 'vtpm-qcow libvirt enable' (see 'vtpm-qcow libvirt hook --help').\n"
        f'exec {command} libvirt hook "$@"\n'
    )


def install_hook(hooks_dir: Path = HOOKS_DIR) -> tuple[Path, bool]:
    """Write the hook script; (its path, whether it changed)."""
    path = hook_path(hooks_dir)
    text = hook_script()
    with contextlib.suppress(OSError):
        if path.read_text() == text and os.access(path, os.X_OK):
            return path, False
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{HOOK_NAME}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
    return path, True


def _connect(uri: str) -> Any:
    lv = libvirt_api()
    try:
        return lv.open(uri)
    except lv.libvirtError as err:
        raise LibvirtError(f"cannot connect: {err.get_error_message()}", path=uri) from None


def _domain(conn: Any, uri: str, name: str) -> Any:
    lv = libvirt_api()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError:
        try:
            return conn.lookupByUUIDString(name)
        except lv.libvirtError:
            raise LibvirtError(f"no such domain: {name}", path=uri) from None


def _inactive_info(dom: Any, uri: str) -> DomainInfo:
    xml = dom.XMLDesc(libvirt_api().VIR_DOMAIN_XML_INACTIVE)
    return parse_domain(xml, source=f"{uri} domain {dom.name()}")


def _require_shut_off(dom: Any, uri: str, what: str) -> None:
    if dom.isActive():
        raise LibvirtError(f"domain {dom.name()} is running: shut it down to {what}", path=uri)


def _chown_tree(path: Path, user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)


def enable(uri: str, name: str, image: str, *, state_root: Path = STATE_ROOT) -> list[str]:
    """Opt domain ``name`` in with ``image``; the report lines."""
    image = os.path.abspath(image)
    if Path(image).is_relative_to(state_root):
        raise LibvirtError(
            f"{image} lies in libvirt's TPM state directory, which 'virsh undefine' deletes: "
            "choose another place"
        )
    conn = _connect(uri)
    try:
        dom = _domain(conn, uri, name)
        _require_shut_off(dom, uri, "enable vtpm-qcow")
        info = _inactive_info(dom, uri)
        if info.tpm_backend != "emulator":
            raise LibvirtError(
                f"domain {name} has no <tpm> with <backend type='emulator'> "
                f"(found: {info.tpm_backend or 'no TPM'})",
                path=uri,
            )
        lines = []
        plain = state_dir(info, state_root)
        if os.path.exists(image):
            lines.append(f"using the existing vTPM image {image}")
        elif plain.is_dir() and any(p.name.endswith(".permall") for p in plain.iterdir()):
            run(["create", image])
            run(["import", image, str(plain)])
            lines.append(f"moved libvirt's TPM state of {name} from {plain} into {image}")
        else:
            tpm12 = ["--tpm12"] if info.tpm_version == "1.2" else []
            run(["setup", "--create", *tpm12, image, *LIBVIRT_SETUP_OPTIONS])
            lines.append(f"manufactured a TPM for {name} in {image} (EK and certificates)")
        if plain.is_dir() and not os.path.ismount(plain):
            kept = plain.with_name(plain.name + KEPT_SUFFIX)
            if any(plain.iterdir()):
                plain.rename(kept)
                lines.append(f"kept libvirt's former state directory as {kept}")
        lv = libvirt_api()
        dom.setMetadata(
            lv.VIR_DOMAIN_METADATA_ELEMENT,
            metadata_xml(image, uri),
            METADATA_PREFIX,
            METADATA_URI,
            lv.VIR_DOMAIN_AFFECT_CONFIG,
        )
        current = dom.snapshotCurrent().getName() if dom.hasCurrentSnapshot() else None
        record(parse_domain(dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)), current=current)
        lines.append(f"enabled: domain {name} keeps its TPM in {image}")
        return lines
    finally:
        conn.close()


def disable(uri: str, name: str, *, state_root: Path = STATE_ROOT) -> list[str]:
    """Opt domain ``name`` out: its current TPM state becomes libvirt's plain state again."""
    conn = _connect(uri)
    try:
        dom = _domain(conn, uri, name)
        _require_shut_off(dom, uri, "disable vtpm-qcow")
        info = _inactive_info(dom, uri)
        if info.image is None:
            raise LibvirtError(f"domain {name} is not enabled", path=uri)
        plain = state_dir(info, state_root)
        if os.path.ismount(plain):
            raise LibvirtError(f"{plain} is still mounted (the domain was not released)")
        if plain.exists() and any(plain.iterdir()):
            raise LibvirtError(f"{plain} is not empty: move it away first", path=str(plain))
        plain.mkdir(mode=0o700, parents=True, exist_ok=True)
        tpm = ["--tpm12"] if info.tpm_version == "1.2" else ["--tpm2"]
        run(["export", "--dir", *tpm, info.image, str(plain)])
        _chown_tree(plain.parent, SWTPM_USER)
        lv = libvirt_api()
        dom.setMetadata(
            lv.VIR_DOMAIN_METADATA_ELEMENT, None, None, METADATA_URI, lv.VIR_DOMAIN_AFFECT_CONFIG
        )
        return [
            f"disabled: domain {name} keeps its TPM in {plain} again",
            f"the image {info.image} and its snapshots stay (delete it when no longer needed)",
        ]
    finally:
        conn.close()


@dataclass(frozen=True)
class DomainStatus:
    name: str
    uuid: str
    running: bool
    image: str | None
    follower: int | None
    disk_tags: tuple[str, ...]
    vtpm_tags: tuple[str, ...]

    @property
    def aligned(self) -> bool:
        return set(self.disk_tags) == set(self.vtpm_tags)


def status(uri: str, name: str | None = None) -> list[DomainStatus]:
    """The enabled domains (or ``name``), with what runs and whether the tags agree."""
    import qcow2
    from qcow2.errors import Qcow2Error

    def tags(path: str) -> tuple[str, ...]:
        try:
            with qcow2.open(path, force_share=True) as image:
                return tuple(e.name for e in image.snapshots)
        except (Qcow2Error, OSError):
            return ()

    conn = _connect(uri)
    try:
        domains = [_domain(conn, uri, name)] if name else conn.listAllDomains()
        out = []
        for dom in domains:
            info = parse_domain(dom.XMLDesc(0), source=f"{uri} domain {dom.name()}")
            if info.image is None and name is None:
                continue
            disk_tags = sorted({t for f in info.qcow2_files for t in tags(f)})
            out.append(
                DomainStatus(
                    info.name,
                    info.uuid,
                    bool(dom.isActive()),
                    info.image,
                    _pid(follower_pid_file(info)),
                    tuple(disk_tags),
                    tags(info.image) if info.image else (),
                )
            )
        return out
    finally:
        conn.close()
