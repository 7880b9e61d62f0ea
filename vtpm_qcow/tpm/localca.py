"""The local CA that signs swtpm_setup's EK and platform certificates, left as its owner has it.

``swtpm_setup --create-ek-cert`` runs ``swtpm_localca`` (its ``create_certs_tool``), which
keeps a CA in a state directory (Debian: ``/var/lib/swtpm-localca``, made ``tss:root 0750``
by swtpm-tools' postinst, then filled by whoever signs first; libvirt signs as ``tss``).  Run
as root, the tool leaves root-owned files there (its lock file, the serial counter, a new CA's
keys), and every later ``swtpm_setup`` of libvirt's, as ``tss``, fails with ``Need read/write
rights on .../.lock.swtpm-localca``.  So :func:`setup_options` gives ``swtpm_setup`` a
configuration of its own (``--config``) in which:

* with ``ca_dir``, the certificates come from a CA in that directory (created there, owned by
  the caller, when missing);
* otherwise, when the caller is root and the CA directory belongs to another user, the tool
  runs as that user (and the user's group): this module's ``main``, run by ``swtpm_setup``
  in the tool's place, hands the tool a scratch directory of that user's for the
  certificates and copies them back where ``swtpm_setup`` wants them.  A CA directory that
  already holds files of another owner (left by an earlier run as root) is refused with the
  ``chown`` that repairs it.

The system's own configuration is read the way ``swtpm_setup`` reads it:
``$XDG_CONFIG_HOME/swtpm_setup.conf`` (``~/.config``) first, else ``/etc/swtpm_setup.conf``.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SwtpmError

SETUP_CONF = "swtpm_setup.conf"
SYSTEM_SETUP_CONF = Path("/etc") / SETUP_CONF
#: swtpm_setup options that make it run the certificate tool
CERT_OPTIONS = frozenset({"--create-ek-cert", "--create-platform-cert"})
#: what this module's ``main`` is run as (``python -m``)
MODULE = "vtpm_qcow.tpm.localca"


def read_conf(path: Path) -> dict[str, str]:
    """``key = value`` lines of a swtpm configuration file (``#`` comments)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as err:
        raise SwtpmError(f"cannot read: {err.strerror}", path=str(path), errno=err.errno) from err
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


def system_setup_conf() -> Path:
    """The swtpm_setup.conf that ``swtpm_setup`` itself would read."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    user_conf = Path(config_home) / SETUP_CONF
    return user_conf if os.access(user_conf, os.R_OK) else SYSTEM_SETUP_CONF


@dataclass
class CaOwner:
    """Who the certificate tool runs as."""

    uid: int
    gid: int
    name: str


def _ca_owner(statedir: Path) -> CaOwner | None:
    """The user to sign as: the CA directory's owner when that is not us (and we are root)."""
    if os.geteuid() != 0:
        return None
    try:
        st = statedir.stat()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SwtpmError(
            f"local CA unusable: {err.strerror}", path=str(statedir), errno=err.errno
        ) from err
    if st.st_uid == 0:
        return None
    try:
        entry = pwd.getpwuid(st.st_uid)
    except KeyError:
        raise SwtpmError(
            f"local CA directory owned by uid {st.st_uid}, which is no user", path=str(statedir)
        ) from None
    strangers = sorted(
        child.name for child in statedir.iterdir() if child.lstat().st_uid != st.st_uid
    )
    if strangers:
        raise SwtpmError(
            f"local CA holds files not owned by its owner {entry.pw_name} "
            f"({', '.join(strangers)}; left by an earlier run as root?): "
            f"chown -R {entry.pw_name} {statedir}",
            path=str(statedir),
        )
    return CaOwner(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _write_conf(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{key} = {value}\n" for key, value in values.items()))


def setup_options(options: Sequence[str], workdir: Path, ca_dir: str | None) -> list[str]:
    """The ``--config`` swtpm_setup needs so that the CA is left as its owner has it (or
    ``ca_dir`` is used), written into ``workdir``; none when no certificate is asked for or
    the caller gave a ``--config`` of their own."""
    if not CERT_OPTIONS.intersection(options) or "--config" in options:
        return []
    source = system_setup_conf()
    conf = read_conf(source)
    tool = conf.get("create_certs_tool")
    if not tool:
        return []
    if ca_dir is not None:
        statedir = Path(os.path.abspath(ca_dir))
        try:
            statedir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as err:
            raise SwtpmError(
                f"cannot create the CA directory: {err.strerror}",
                path=str(statedir),
                errno=err.errno,
            ) from err
        ca_conf = workdir / "swtpm-localca.conf"
        _write_conf(
            ca_conf,
            {
                "statedir": str(statedir),
                "signingkey": str(statedir / "signkey.pem"),
                "issuercert": str(statedir / "issuercert.pem"),
                "certserial": str(statedir / "certserial"),
            },
        )
        conf["create_certs_tool_config"] = str(ca_conf)
    else:
        ca_conf_path = conf.get("create_certs_tool_config")
        if not ca_conf_path:
            return []
        statedir_text = read_conf(Path(ca_conf_path)).get("statedir")
        owner = _ca_owner(Path(statedir_text)) if statedir_text else None
        if owner is None:
            return []
        real_tool = shutil.which(tool)
        if real_tool is None:
            raise SwtpmError(f"certificate tool {tool} not found (named in {source})")
        wrapper = workdir / "create-certs-as-owner"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"exec {shlex.quote(sys.executable)} -m {MODULE} "
            f'{owner.uid} {owner.gid} {shlex.quote(real_tool)} "$@"\n'
        )
        wrapper.chmod(0o700)
        conf["create_certs_tool"] = str(wrapper)
    setup_conf = workdir / SETUP_CONF
    _write_conf(setup_conf, conf)
    return ["--config", str(setup_conf)]


def run_tool_as(uid: int, gid: int, tool: str, args: list[str]) -> int:
    """Run the certificate tool as ``uid``/``gid`` in ``swtpm_setup``'s place: the
    certificates go to a scratch directory of that user's and are copied into the ``--dir``
    ``swtpm_setup`` named; its log goes into swtpm_setup's ``--logfile``."""
    args = list(args)
    target = logfile = None
    if "--dir" in args:
        at = args.index("--dir")
        target = args[at + 1]
        del args[at : at + 2]
    if "--logfile" in args:
        at = args.index("--logfile")
        logfile = args[at + 1]
        del args[at : at + 2]
    scratch = Path(tempfile.mkdtemp(prefix="vtpm-qcow-certs-"))
    try:
        os.chown(scratch, uid, gid)
        name = pwd.getpwuid(uid).pw_name
        done = subprocess.run(
            [tool, "--dir", str(scratch), *args],
            user=uid,
            group=gid,
            extra_groups=os.getgrouplist(name, gid),
            cwd="/",
            capture_output=True,
            check=False,
        )
        if logfile is not None:  # as the tool itself would have written it
            with open(logfile, "ab") as log:
                log.write(done.stdout + done.stderr)
        else:
            sys.stdout.buffer.write(done.stdout)
            sys.stderr.buffer.write(done.stderr)
        if done.returncode == 0 and target is not None:
            for cert in scratch.iterdir():
                shutil.copyfile(cert, Path(target) / cert.name)
        return done.returncode
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str]) -> int:
    """``python -m vtpm_qcow.tpm.localca UID GID TOOL ARGS...`` (what swtpm_setup runs)."""
    if len(argv) < 3:
        print(f"usage: python -m {MODULE} UID GID TOOL [ARGS...]", file=sys.stderr)
        return 2
    return run_tool_as(int(argv[0]), int(argv[1]), argv[2], argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
