"""qemu-img's ``--object secret,...`` and ``--image-opts`` for the ``qcow2`` command.

* :func:`parse_qemu_opts` splits QemuOpts text (``key=value,...``; ``,,`` is a comma);
* :func:`parse_secrets` turns ``--object secret,id=ID,data=PASS|file=PATH[,format=base64]``
  arguments into ``{id: bytes}``;
* :func:`image_spec` turns an image argument (a file name, or with ``--image-opts`` a
  ``driver=qcow2,file.filename=IMG,encrypt.key-secret=ID`` string) into an
  :class:`ImageSpec`: the file to open, the format, the key, and the names qemu-img shows.

Failures raise :class:`OptionError` with qemu-img's message (no ``qemu-img:`` prefix).
"""

from __future__ import annotations

from ..errors import OptionError


def parse_qemu_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """``key=value`` pairs of QemuOpts ``text`` in order (``,,`` stands for a comma).  A
    first item without ``=`` is the value of ``implied`` (e.g. ``qom-type``)."""
    items: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            items.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    items.append(current)
    pairs = []
    for index, item in enumerate(items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            if index == 0 and implied is not None:
                key, value = implied, item
            else:
                value = "on"
        pairs.append((key, value))
    return pairs


_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _id_wellformed(text: str) -> bool:
    """QEMU's ``id_wellformed``: a letter, then letters, digits, ``_``, ``.``, ``-``."""
    return text[:1].isascii() and text[:1].isalpha() and set(text) <= _ID_CHARS


_SECRET_KEYS = {"qom-type", "id", "data", "file", "format", "keyid", "iv"}


def parse_secrets(objects: list[str] | None) -> dict[str, bytes]:
    """The secrets given with ``--object``, by id."""
    secrets: dict[str, bytes] = {}
    for text in objects or []:
        opts: dict[str, str] = {}
        for key, value in parse_qemu_opts(text, implied="qom-type"):
            opts[key] = value
        qom_type = opts.get("qom-type")
        if qom_type is None:
            raise OptionError("Parameter 'qom-type' is missing")
        if qom_type != "secret":
            raise OptionError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        for key in opts:
            if key not in _SECRET_KEYS:
                raise OptionError(f"Parameter '{key}' is unexpected")
        ident = opts.get("id")
        if ident is None:
            raise OptionError("Parameter 'id' is missing")
        if not _id_wellformed(ident):
            raise OptionError(
                "Parameter 'id' expects an identifier\nIdentifiers consist of letters, "
                "digits, '-', '.', '_', starting with a letter."
            )
        if "keyid" in opts or "iv" in opts:
            raise OptionError("secrets encrypted with another secret (keyid) are not supported")
        if "data" in opts and "file" in opts:
            raise OptionError("'file' and 'data' are mutually exclusive")
        if "data" in opts:
            raw = opts["data"].encode("utf-8", "surrogateescape")
        elif "file" in opts:
            raw = _read_secret_file(opts["file"])
        else:
            raise OptionError("Either 'file' or 'data' must be provided")
        fmt = opts.get("format", "raw")
        if fmt == "base64":
            import base64
            import binascii

            try:
                raw = base64.b64decode(raw, validate=True)
            except binascii.Error as err:
                raise OptionError(f"secret '{ident}': invalid base64 data") from err
        elif fmt != "raw":
            raise OptionError(f"Parameter 'format' does not accept value '{fmt}'")
        if ident in secrets:
            raise OptionError(
                f"attempt to add duplicate property '{ident}' to object (type 'container')"
            )
        secrets[ident] = raw
    return secrets


def _read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise OptionError(
            f"Unable to read {path}: Failed to open file \u201c{path}\u201d: {err.strerror}"
        ) from err


class ImageSpec:
    """One image argument resolved (read-only after construction).

    ``path`` is the file to open; ``arg`` is the argument as given (qemu-img's name in
    "Could not open '...'"); ``display`` is the name ``info`` shows; ``fmt`` the format
    (None: probe); ``key_id`` the ``encrypt.key-secret`` id and ``key`` its secret (None
    if no secret of that id was given); ``options`` the qcow2 open options given
    (``overlap-check`` ...), validated, for :func:`qcow2.open`."""

    __slots__ = ("arg", "display", "fmt", "key", "key_id", "options", "path")

    def __init__(
        self,
        path: str,
        arg: str,
        display: str,
        fmt: str | None = None,
        key_id: str | None = None,
        key: bytes | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.options = options or {}
        self.arg = arg
        self.display = display
        self.fmt = fmt
        self.key_id = key_id
        self.key = key

    def require_key(self) -> bytes | None:
        """The key, or :class:`OptionError` "No secret with id" if its id is unknown (an
        open with I/O needs it; ``info`` does not)."""
        if self.key_id is not None and self.key is None:
            raise OptionError(f"No secret with id '{self.key_id}'")
        return self.key


_IMAGE_OPTS = {"driver", "file.filename", "file.driver", "encrypt.key-secret"}


def image_spec(
    arg: str, *, image_opts: bool, fmt: str | None, secrets: dict[str, bytes]
) -> ImageSpec:
    """Resolve an image argument (see the module docstring)."""
    if not image_opts:
        return ImageSpec(path=arg, arg=arg, display=arg, fmt=fmt)
    if fmt is not None:
        raise OptionError("--image-opts and --format are mutually exclusive")
    opts = dict(parse_qemu_opts(arg))
    if not opts or "=" not in arg.split(",", 1)[0]:
        raise OptionError(
            f"Could not open '{arg}': Cannot find device='{arg}' nor node-name='{arg}'"
        )
    from ..overlap import OPTIONS

    for key in opts:
        if key not in _IMAGE_OPTS and key not in OPTIONS:
            raise OptionError(
                f"Could not open '{arg}': Block format does not support option '{key}'"
            )
    open_options = {key: value for key, value in opts.items() if key in OPTIONS}
    if open_options:
        from ..errors import OpenOptionError
        from ..overlap import parse_options

        try:
            parse_options(open_options)
        except OpenOptionError as err:
            raise OptionError(f"Could not open '{arg}': {err.message}") from err
    filename = opts.get("file.filename")
    if filename is None:
        raise OptionError(f"Could not open '{arg}': A block device must be specified for \"file\"")
    driver = opts.get("driver")
    if driver not in (None, "qcow2", "raw"):
        raise OptionError(f"Could not open '{arg}': Unknown driver '{driver}'")
    key_id = opts.get("encrypt.key-secret")
    display = filename
    if key_id is not None:
        # bdrv_refresh_filename: options beyond driver and file make a json: name
        options: dict[str, object] = {
            "driver": driver or "qcow2",
            "file": {"driver": opts.get("file.driver", "file"), "filename": filename},
            "encrypt.key-secret": key_id,
        }
        display = "json:" + qemu_compact_json(options)
    return ImageSpec(
        path=filename,
        arg=arg,
        display=display,
        fmt=driver,
        key_id=key_id,
        key=secrets.get(key_id) if key_id is not None else None,
        options=open_options,
    )


def qemu_compact_json(obj: object) -> str:
    """QEMU's one-line ``qobject_to_json`` of a dict built in insertion order."""
    import json

    from ..tools.qemujson import qdict_order

    return json.dumps(qdict_order(obj), separators=(", ", ": "))
