"""Less resident memory for the mount daemon: imports it defers, and settling after start-up.

One daemon runs per VM, so its resident memory counts (docs/BENCHMARKS.md).  trio imports
``ssl`` (OpenSSL's libssl and libcrypto, initialised), ``hmac`` (hashlib, which loads
OpenSSL's libcrypto again, for DTLS cookies) and ``idna`` (large Unicode tables, for host
names) when it is imported, and uses each only inside functions a FUSE daemon never calls
(TLS and DTLS streams, name resolution).  Together they are a good part of a daemon's RSS
(docs/BENCHMARKS.md, "Daemon memory").

:func:`defer` puts, for each such module not imported yet, the real module into
``sys.modules`` with its spec but without running its code: the code runs on the first use
of any attribute the module does not have yet (a module ``__getattr__``, PEP 562), in the
same module object.  ``import ssl`` and ``import ssl as x`` bind the module without running
it; ``from ssl import SSLContext`` or ``ssl.SSLContext`` run it first.  A program that does
use one gets it, only later: nothing behaves differently except when the module's code
runs.

:func:`settle`, once the daemon serves, collects start-up's garbage, freezes what is left
(later collections no longer walk the modules' objects) and hands the C heap's free pages
back to the kernel; :func:`trim_when_idle` does the latter again whenever the daemon has
gone idle after serving requests.

Only the daemon's commands call :func:`defer` and :func:`settle` (``vtpm-qcow mount`` and
``serve``: before importing the daemon, once it is ready), the library never does; the
daemon runs :func:`trim_when_idle`.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

#: What trio imports that a mount daemon does not use (trio 0.22-0.2x: trio._ssl and
#: trio._highlevel_ssl_helpers, trio._dtls, trio._socket).
DAEMON_UNUSED = ("ssl", "hmac", "idna")

#: Seconds without a file system request after which the daemon trims its heap.
IDLE_TRIM_AFTER = 2.0

_lock = threading.RLock()
_trims = 0
_trim_fn: Any = None


def defer(names: Iterable[str] = DAEMON_UNUSED) -> list[str]:
    """Defer running the modules ``names`` until first used; returns those deferred (a
    module already imported, or not installed, is left alone)."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        vars(module)["__getattr__"] = _loader(module, spec)
        sys.modules[name] = module
        deferred.append(name)
    return deferred


def is_deferred(name: str) -> bool:
    """Whether module ``name`` is in ``sys.modules`` with its code not run yet."""
    module = sys.modules.get(name)
    hook = vars(module).get("__getattr__") if module is not None else None
    return getattr(hook, "_vtpm_qcow_pending", False) is True


def loaded_modules() -> list[str]:
    """The names of the modules imported and run (deferred ones left out), sorted."""
    return sorted(name for name in list(sys.modules) if not is_deferred(name))


def _loader(module: types.ModuleType, spec: importlib.machinery.ModuleSpec) -> object:
    def load(attribute: str) -> object:
        # The hook stays in place while the code runs: another thread waits on the lock
        # for the finished module instead of finding a half-run one without the hook.
        with _lock:
            if load._vtpm_qcow_pending:  # type: ignore[attr-defined]
                load._vtpm_qcow_pending = False  # type: ignore[attr-defined]
                assert spec.loader is not None
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    # as a failed import: gone from sys.modules, the next import retries
                    if sys.modules.get(spec.name) is module:
                        del sys.modules[spec.name]
                    raise
                finally:
                    if vars(module).get("__getattr__") is load:
                        del vars(module)["__getattr__"]
            elif vars(module).get("__getattr__") is load:
                # this thread is running the module's code, which uses a name not set yet
                raise AttributeError(
                    f"partially initialized module {spec.name!r} has no attribute {attribute!r}"
                )
        # the code has run: an ordinary lookup (with the module's own __getattr__, if any)
        return getattr(module, attribute)

    load._vtpm_qcow_pending = True  # type: ignore[attr-defined]
    return load


def settle() -> None:
    """After start-up: collect, freeze, and return the C heap's free memory."""
    gc.collect()
    gc.freeze()
    trim_heap()


def trim_heap() -> bool:
    """Return the C heap's free pages to the kernel (glibc's ``malloc_trim``; False on
    another C library)."""
    global _trims
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    _trims += 1
    return True


def heap_trims() -> int:
    """How many times this process has trimmed its heap (the daemon's ``info``)."""
    return _trims


async def trim_when_idle(activity: Callable[[], int], idle: float = IDLE_TRIM_AFTER) -> None:
    """Forever: trim the heap once ``activity()`` (a count of requests served) has stood
    still for ``idle`` seconds after it moved.

    A burst of commits (a VM's boot) leaves freed heap that glibc keeps in the middle of
    the heap; trimmed, the idle daemon is back to its size after start-up
    (docs/BENCHMARKS.md, "Daemon memory").  A trim takes well under a millisecond, run only
    after ``idle`` seconds without a request.
    """
    await when_idle(activity, trim_heap, idle)


async def when_idle(activity: Callable[[], int], action: Callable[[], object], idle: float) -> None:
    """Forever: run ``action()`` once ``activity()`` (a count) has stood still for ``idle``
    seconds after it moved; once per stretch of quiet."""
    import trio  # here: importing this module must not import trio (defer comes first)

    seen = done = activity()
    while True:
        await trio.sleep(idle)
        now = activity()
        if now == seen and now != done:
            action()
            done = now
        seen = now


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim_fn
    if _trim_fn is None:
        try:
            _trim_fn = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _trim_fn = False
    return _trim_fn or None
