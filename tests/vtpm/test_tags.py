"""Tags are snapshot names, never snapshot IDs (issue 10).

The vTPM image's snapshot IDs are not the disks' IDs: a tag ``2`` must select the snapshot
*named* ``2``, even when another snapshot has ID 2.  qemu-img's own lookup (ID first, then
name) stays in the ``qcow2`` command; every ``vtpm_qcow`` path looks tags up by name only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vtpm.mount_fixtures import (
    create_image,
    mounted,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
    state_blob,
    vtpm_qcow,
)
from vtpm_qcow.errors import StoreError
from vtpm_qcow.state.store import Store, digest

pytestmark = pytest.mark.usefixtures("runtime_dir")

#: tag -> the snapshot ID it gets: every numeric tag is also another snapshot's ID
TAGS = {"2": "1", "before": "2", "1": "3", "10": "4"}


def permall_of(tag: str) -> bytes:
    return state_blob(f"permall of {tag}".encode() * 50)


def tagged_image(path: Path) -> Path:
    """An image with snapshots named 2, before, 1, 10 (IDs 1-4), each holding its own
    permall, and the active state 'active'."""
    create_image(path)
    with Store.open(path) as store:
        for tag, expected_id in TAGS.items():
            store.write_section("permall", permall_of(tag))
            store.create_snapshot(tag)
            assert store.snapshots()[-1].id == expected_id
        store.write_section("permall", permall_of("active"))
    return path


def test_the_store_looks_tags_up_by_name(tmp_path: Path) -> None:
    image = tagged_image(tmp_path / "vtpm.qcow2")
    with Store.open(image) as store:
        listed = {s.tag: s.sections["permall"].digest for s in store.snapshots()}
        assert listed == {tag: digest(permall_of(tag)) for tag in TAGS}
        for tag in TAGS:
            assert store.snapshot_section(tag, "permall") == permall_of(tag)
            store.apply_snapshot(tag)
            assert store.read_section("permall") == permall_of(tag)
        store.delete_snapshot("1")  # the tag '1' (ID 3), not ID 1 (tag '2')
        assert [s.tag for s in store.snapshots()] == ["2", "before", "10"]
        store.delete_snapshot("2")
        assert [s.tag for s in store.snapshots()] == ["before", "10"]
        with pytest.raises(StoreError, match="no snapshot '4'"):
            store.apply_snapshot("4")  # an ID that exists is still not a tag


def test_the_snapshot_command_looks_tags_up_by_name(tmp_path: Path) -> None:
    image = tagged_image(tmp_path / "vtpm.qcow2")
    listing = json.loads(vtpm_qcow("snapshot", "-l", "--json", str(image)).stdout)
    shown = {s["tag"]: s for s in listing}
    assert {s["tag"]: s["id"] for s in listing} == TAGS
    for tag in TAGS:
        vtpm_qcow("snapshot", "-a", tag, str(image))
        assert raw_sections(image)["permall"] == permall_of(tag)
        with Store.open(image, writable=False) as store:
            assert store.state_digest() == shown[tag]["state_digest"]
    vtpm_qcow("snapshot", "-d", "10", str(image))
    refused = vtpm_qcow("snapshot", "-a", "4", str(image), check=False)
    assert refused.returncode != 0 and "no snapshot '4'" in refused.stderr
    assert [
        s["tag"] for s in json.loads(vtpm_qcow("snapshot", "-l", "--json", str(image)).stdout)
    ] == [
        "2",
        "before",
        "1",
    ]


def test_a_mounted_store_applies_tags_by_name(tmp_path: Path) -> None:
    image = tagged_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt", view="dir") as mount:
        for tag in ("2", "1", "before"):
            vtpm_qcow("snapshot", "-a", tag, str(image))  # through the daemon's control socket
            assert (mount.mountpoint / "tpm2-00.permall").read_bytes() == permall_of(tag)
        vtpm_qcow("snapshot", "-d", "2", str(image))
        assert [s["tag"] for s in mount.control().snapshot_list()] == ["before", "1", "10"]
