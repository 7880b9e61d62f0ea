"""Shared helpers for tests that run the real swtpm / swtpm_setup (through vtpm_qcow.tpm.swtpm).

Every swtpm started here is stopped (and reaped) in a ``finally`` block.  The TCP layout
(data channel on port N, control on N+1) is what tpm2-tools' ``-T swtpm:port=N`` expects.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import need
from vtpm_qcow.errors import SwtpmError
from vtpm_qcow.tpm.client import SwtpmSocketTransport, Tpm
from vtpm_qcow.tpm.swtpm import Swtpm, free_tcp_port_pair, run_setup

NV_INDEX = 0x01500020


def need_swtpm() -> None:
    """Fail (or skip with VTPM_QCOW_ALLOW_SKIP=1) without swtpm and swtpm_setup."""
    need("swtpm")
    need("swtpm_setup")


def setup_state(tpmstate: str, *options: str) -> None:
    """Manufacture a TPM 2.0 into ``tpmstate`` (a dir or ``file://PATH``)."""
    need_swtpm()
    run_setup(tpmstate, options=options)


@contextlib.contextmanager
def running_swtpm(tpmstate: str, workdir: Path, **kwargs: object) -> Iterator[Swtpm]:
    """swtpm on TCP ports N/N+1 (retrying if another process grabs the ports first)."""
    need_swtpm()
    last: SwtpmError | None = None
    for _ in range(3):
        port = free_tcp_port_pair()
        try:
            swtpm = Swtpm.start(tpmstate, workdir, server=port, ctrl=port + 1, **kwargs)  # type: ignore[arg-type]
        except SwtpmError as err:
            last = err
            continue
        try:
            yield swtpm
        finally:
            swtpm.stop()
        return
    raise AssertionError(f"swtpm did not start: {last}")


@contextlib.contextmanager
def tpm_client(swtpm: Swtpm) -> Iterator[Tpm]:
    """A raw TPM 2.0 client on a running swtpm's data channel (closed on exit)."""
    assert swtpm.server is not None
    with SwtpmSocketTransport(swtpm.server, swtpm.ctrl) as transport:
        yield Tpm(transport)


def tpm2_tool(swtpm: Swtpm, tool: str, *args: str) -> str:
    """Run ``tpm2_<tool> -T swtpm:...`` against ``swtpm``; AssertionError with stderr on failure."""
    binary = need(f"tpm2_{tool}")
    done = subprocess.run(
        [binary, "-T", f"swtpm:host=127.0.0.1,port={swtpm.server}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TSS2_LOG": "all+none"},
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"tpm2_{tool} {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout
