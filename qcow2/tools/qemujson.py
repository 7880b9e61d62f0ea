"""qemu-img's JSON: QEMU's ``QDict`` key order and its pretty printer.

QEMU iterates a ``QDict`` by hash bucket (``tdb_hash``), not in insertion order, and
prints JSON with 4-space indents and its own string escapes.  :func:`qemu_json` turns an
object built in QEMU's insertion order into exactly the text qemu-img prints;
:func:`qdict_order` gives the key order alone (for the command's one-line JSON names).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _tdb_hash(key: str) -> int:
    """QEMU's ``tdb_hash`` (qobject/qdict.c) of a QDict key."""
    raw = key.encode()
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, ch in enumerate(raw):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


_QDICT_BUCKETS = 512


def qdict_order(obj: Any) -> Any:
    """``obj`` with every dict re-ordered as QEMU iterates a QDict built in insertion order.

    Keys iterate by hash bucket; a later insertion into the same bucket comes first.
    """
    if isinstance(obj, dict):
        items = list(obj.items())
        keyed = sorted(enumerate(items), key=lambda p: (_tdb_hash(p[1][0]) % _QDICT_BUCKETS, -p[0]))
        return {k: qdict_order(v) for _, (k, v) in keyed}
    if isinstance(obj, list):
        return [qdict_order(v) for v in obj]
    return obj


def _json_str(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif code < 0x20 or code >= 0x7F:
            if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
                out.append("\\uFFFD")
            elif code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 | (code >> 10):04X}\\u{0xDC00 | (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json(obj: Any, indent: int) -> str:
    pad = "    " * (indent + 1)
    end = "    " * indent
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, str):
        return _json_str(obj)
    if obj is None:
        return "null"
    if isinstance(obj, dict):
        if not obj:
            return "{\n" + end + "}"
        body = ",\n".join(f"{pad}{_json_str(k)}: {_json(v, indent + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + end + "}"
    if isinstance(obj, list):
        if not obj:
            return "[\n" + end + "]"
        body = ",\n".join(pad + _json(v, indent + 1) for v in obj)
        return "[\n" + body + "\n" + end + "]"
    raise TypeError(f"cannot encode {type(obj).__name__} as QEMU JSON")


def qemu_json(obj: Any) -> str:
    """``obj`` as qemu-img's pretty JSON (4-space indent, QDict key order), no newline."""
    return _json(qdict_order(obj), 0)
