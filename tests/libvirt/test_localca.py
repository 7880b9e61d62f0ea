"""The swtpm local CA after ``vtpm-qcow setup --create-ek-cert`` as root: its owners are
unchanged and libvirt still manufactures a vTPM for a domain (swtpm_setup as ``tss``).

The private libvirtd's namespace has a fresh CA directory (``tss:root 0750``, as swtpm-tools
install it) and ``vtpm-qcow setup`` runs in that namespace: root signs first, as on a new
machine where the user tries vtpm-qcow before libvirt.  tests/vtpm/test_localca.py covers
the same with private CAs found through ``XDG_CONFIG_HOME``.
"""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

from tests.helpers import need
from tests.libvirt.conftest import PREFIX, Libvirtd, domain_xml
from tests.vtpm.mount_fixtures import raw_sections

EMULATOR_TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


def owners(statedir: Path) -> dict[str, int]:
    out = {".": statedir.stat().st_uid}
    for child in statedir.iterdir():
        out[child.name] = child.lstat().st_uid
    return out


def test_setup_as_root_leaves_libvirts_ca_usable(lv: Libvirtd, tmp_path: Path) -> None:
    statedir = lv.base / "localca"  # /var/lib/swtpm-localca in libvirtd's namespace
    for child in statedir.iterdir():  # a CA no one has signed with yet
        child.unlink()
    owner = statedir.stat().st_uid
    assert pwd.getpwuid(owner).pw_name == "tss"

    image = tmp_path / "vtpm.qcow2"
    done = subprocess.run(
        lv.in_namespace(
            need("vtpm-qcow"),
            "setup",
            "--create",
            str(image),
            "--create-ek-cert",
            "--create-platform-cert",
        ),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "permall" in raw_sections(image)
    after = owners(statedir)
    assert "signkey.pem" in after  # this run made the CA
    assert set(after.values()) == {owner}, {
        name: pwd.getpwuid(uid).pw_name for name, uid in after.items()
    }

    # libvirt's own manufacturing (swtpm_setup as tss, on the first start) still works
    name = lv.define(domain_xml(PREFIX + "localca", EMULATOR_TPM))
    lv.virsh("start", name)
    assert lv.state(name) == "running"
    lv.virsh("destroy", name)
    assert set(owners(statedir).values()) == {owner}
