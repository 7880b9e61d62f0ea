"""The ``qcow2`` command: a drop-in for the qemu-img 7.2 subcommands scripts rely on.

``qcow2 info|check|snapshot|map|create|resize|compare|convert`` take qemu-img's options and
print qemu-img's output (same text, same JSON, same exit codes), without QEMU installed.
Error lines keep qemu-img's wording and its ``qemu-img:`` prefix so that scripts parsing
them keep working.  Every failure is one line on stderr and a non-zero exit; no traceback.

Start-up is kept short: each subcommand imports only the modules it needs.
"""

from __future__ import annotations

import os
import sys

from ..errors import CommandError
from .parse import Arguments, Command, HelpRequested, Option, parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

PROG = "qemu-img"
DESCRIPTION = "qemu-img compatible qcow2 tool (pure Python, no QEMU needed)."


def _api() -> Any:
    """The :mod:`qcow2` package's read/write API (imported only by the commands using it)."""
    import importlib

    return importlib.import_module("qcow2")


def _err(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")


def _print_corruption(line: str, path: str | None) -> None:
    """The corruption reporter of the command: QEMU's line on stderr."""
    del path
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _open_error(path: str, err: BaseException) -> CommandError:
    """qemu-img's "Could not open 'PATH': REASON" for an open failure."""
    from ..errors import ImageLockedError, Qcow2Error

    if isinstance(err, ImageLockedError):
        # QEMU prints the lock failure, then its hint on a line of its own.
        first, sep, hint = err.message.partition(". Is another process")
        if sep:
            return CommandError(f"Could not open '{path}': {first}\nIs another process{hint}")
    reason = err.message if isinstance(err, Qcow2Error) else str(err)
    if reason.startswith("Too much extra metadata in snapshot table entry"):
        # qemu-img's wording, then its hint line
        reason = reason.split(" (", 1)[0]
        reason += "\nYou can force-remove this extra metadata with qemu-img check -r all"
    return CommandError(f"Could not open '{path}': {reason}")


def _spec(args: Arguments, attr: str = "image", fmt: str | None = None) -> Any:
    """The :class:`~qcow2.cli.options.ImageSpec` of image argument ``attr`` (``--object``
    secrets and ``--image-opts`` applied; ``fmt`` overrides ``-f``)."""
    from ..errors import OptionError
    from .options import image_spec, parse_secrets

    try:
        secrets = parse_secrets(getattr(args, "object", None))
        return image_spec(
            getattr(args, attr),
            image_opts=getattr(args, "image_opts", False),
            fmt=args.f if fmt is None else fmt,
            secrets=secrets,
        )
    except OptionError as err:
        raise CommandError(str(err)) from err


def _key(spec: Any) -> bytes | None:
    """The key of an image opened with I/O (the ``--object`` of its key-secret id)."""
    from ..errors import OptionError

    try:
        key: bytes | None = spec.require_key()
    except OptionError as err:
        raise CommandError(f"Could not open '{spec.arg}': {err}") from err
    return key


# Section: info


def _cmd_info(args: Arguments) -> int:
    from ..errors import BackingOpenError, Qcow2Error
    from ..image import chain_layers, open_chain
    from ..tools.info import format_info_human, image_info
    from ..tools.qemujson import qemu_json

    spec = _spec(args)
    try:
        # qemu-img info opens the image alone, --backing-chain the chain
        top = open_chain(
            spec.path,
            spec.fmt,
            force_share=args.U,
            mode="qemu",
            io=False,
            backing=args.backing_chain,
        )
    except BackingOpenError as err:
        # --backing-chain opens every image on its own, so the failure names the backing.
        backing, cause = err.innermost()
        raise _open_error(backing, cause) from err
    except (Qcow2Error, OSError) as err:
        raise _open_error(spec.arg, err) from err
    try:
        layers = chain_layers(top)
        infos = [image_info(layers[0], spec.display)]
        infos += [image_info(layer) for layer in layers[1:]]
    finally:
        top.close()
    if args.output == "json":
        sys.stdout.write(qemu_json(infos if args.backing_chain else infos[0]) + "\n")
    else:
        sys.stdout.write("\n".join(format_info_human(info) for info in infos))
    return 0


# Section: check


def _cmd_check(args: Arguments) -> int:
    from ..check import check_file
    from ..errors import Qcow2Error
    from ..format.header import clear_unknown_autoclear, read_header
    from ..image import open_backing, require_io_resources
    from ..io.fileio import HostFile
    from ..tools.check import format_check_human
    from ..tools.qemujson import qemu_json

    spec = _spec(args)
    try:
        f = HostFile(spec.path, writable=bool(args.r))
    except (Qcow2Error, OSError) as err:
        raise _open_error(spec.arg, err) from err
    try:
        if not args.U:
            from ..io.lock import lock_image

            try:
                lock_image(f.fd, spec.path, writable=bool(args.r))
            except Qcow2Error as err:
                raise _open_error(spec.arg, err) from err
        if spec.fmt == "raw" or (spec.fmt is None and f.pread(0, 4) != b"QFI\xfb"):
            if spec.fmt is None and args.r:
                sys.stderr.write(_RAW_PROBE_WARNING.format(name=spec.arg))
            raise CommandError("This image format does not support checks", 63)
        try:
            header = read_header(f, mode="check")
            require_io_resources(f, header, _key(spec))
            if args.r:
                clear_unknown_autoclear(f, header)
            below = open_backing(f, header, force_share=args.U, mode="qemu")
            if below is not None:
                below.close()  # qemu-img check opens the backing chain too
        except CommandError:
            raise  # no secret for the key (already worded)
        except Qcow2Error as err:
            raise _open_error(spec.arg, err) from err
        from ..overlap import parse_options as parse_overlap_options

        checks = parse_overlap_options(spec.options)  # validated by _spec already
        result = check_file(f, header, args.r, filename=spec.arg, overlap_checks=checks)
    finally:
        f.close()
    for line in result.messages:
        sys.stderr.write(line + "\n")
    if result.error is not None:
        if result.repaired and args.output != "json":
            # qemu-img says what it repaired before the second pass fails
            sys.stdout.write(format_check_human(result).split("Double checking")[0])
            sys.stdout.write("Double checking the fixed image now...\n")
        raise CommandError(f"Check failed: {result.error}")
    if args.output == "json":
        sys.stdout.write(qemu_json(result.to_json()) + "\n")
    else:
        sys.stdout.write(format_check_human(result))
    if result.check_errors:
        raise CommandError("Check failed")
    return result.exit_code


#: What QEMU prints when it opens a probed raw image for writing.
_RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
)


# Section: map


def _cmd_map(args: Arguments) -> int:
    from ..errors import Qcow2Error
    from ..image import chain_layers, open_chain
    from ..tools.map import format_map_human, format_map_json, map_entries

    spec = _spec(args)
    key = _key(spec)
    try:
        top = open_chain(spec.path, spec.fmt, force_share=args.U, key_secret=key, mode="qemu")
    except (Qcow2Error, OSError) as err:
        raise _open_error(spec.arg, err) from err
    try:
        start = parse_size(args.start_offset, "start offset") if args.start_offset else 0
        max_length = parse_size(args.max_length, "max length") if args.max_length else None
        entries, error = map_entries(chain_layers(top), start, max_length)
    finally:
        top.close()
    complete = error is None
    if args.output == "json":
        sys.stdout.write(format_map_json(entries, complete=complete))
    else:
        text, dump_error = format_map_human(entries, complete=complete)
        sys.stdout.write(text)
        if dump_error is not None:
            raise CommandError(dump_error)
    if error is not None:
        raise CommandError("Could not read file metadata: Input/output error")
    return 0


# Section: snapshot


def _cmd_snapshot(args: Arguments) -> int:
    actions = [a for a in ("l", "c", "a", "d") if getattr(args, a)]
    if len(actions) > 1:
        raise CommandError("Cannot mix '-l', '-a', '-c', '-d'")
    action = actions[0] if actions else "l"
    if action == "l":
        from ..errors import Qcow2Error
        from ..image import open_chain
        from ..tools.info import format_snapshot_table

        spec = _spec(args)
        key = _key(spec)
        try:
            # with its backing chain: qemu-img snapshot opens it too
            layer = open_chain(spec.path, spec.fmt, force_share=args.U, key_secret=key, mode="qemu")
        except (Qcow2Error, OSError) as err:
            raise _open_error(spec.arg, err) from err
        layer.close()
        if layer.snapshots:
            sys.stdout.write("Snapshot list:\n" + format_snapshot_table(layer.snapshots))
        return 0
    from ..errors import CorruptImageError, Qcow2Error

    tag = getattr(args, action)
    spec = _spec(args)
    image = _open_image(spec, writable=True, force_share=args.U)
    verb = {"c": "create", "a": "apply", "d": "delete"}[action]
    try:
        with image:
            if action == "c":
                image.create_snapshot(tag)
            elif action == "a":
                image.apply_snapshot(tag)
            else:
                image.delete_snapshot(tag)
    except Qcow2Error as err:
        prefix = f"Could not {verb} snapshot '{tag}': "
        if verb == "apply" and isinstance(err, CorruptImageError) and not err.signaled:
            # QEMU's goto reports what it refuses, then fails the load with its errno
            raise CommandError(
                f"{err.message}\n{PROG}: {prefix}Failed to load snapshot: {os.strerror(err.errno)}"
            ) from err
        reason = _snapshot_reason(verb, err).removeprefix(prefix)  # the library's own words
        raise CommandError(prefix + reason) from err
    return 0


def _open_image(spec: Any, *, writable: bool, force_share: bool) -> Any:
    """``qcow2.open`` of a qcow2 image argument as qemu-img opens it for I/O: an encrypted
    image needs its key."""
    from ..errors import EncryptionKeyError, Qcow2Error

    key = _key(spec)
    try:
        image = _api().open(
            spec.path,
            writable=writable,
            force_share=force_share,
            key_secret=key,
            options=spec.options,
        )
    except (Qcow2Error, OSError) as err:
        raise _open_error(spec.arg, err) from err
    if image.encrypted and key is None:
        image.close()
        raise CommandError(f"Could not open '{spec.arg}': {EncryptionKeyError.MISSING_KEY}")
    return image


def _snapshot_reason(verb: str, err: BaseException) -> str:
    import errno

    from ..errors import CorruptImageError, SnapshotNotFoundError

    if isinstance(err, CorruptImageError) and err.signaled:
        return "-5 (Input/output error)"  # QEMU's -EIO after the corruption line
    if verb == "create" and getattr(err, "errno", None) == errno.EFBIG:
        return "-27 (File too large)"  # QEMU's -EFBIG: the table holds 65536 snapshots
    if isinstance(err, SnapshotNotFoundError):
        return {
            "apply": "Failed to load snapshot: No such file or directory",
            "delete": "snapshot not found",
        }.get(verb, str(err))
    message = getattr(err, "message", str(err))
    return str(message)


# Section: create / resize


_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_SUFFIXES.update({"p": 1 << 50, "e": 1 << 60})


def parse_size(text: str, what: str = "image size") -> int:
    """qemu's ``qemu_strtosz``: ``64M``, ``1.5G``, ``100k``, plain bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([bBkKmMgGtTpPeE]?)", text)
    if not match:
        raise CommandError(
            f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for\n"
            f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    number, suffix = match.groups()
    scale = _SIZE_SUFFIXES[suffix.lower()]
    if "." in number:
        if scale == 1:
            raise CommandError(
                "Invalid image size specified. Must be between 0 and 9223372036854775807."
            )
        value = int(float(number) * scale)
    else:
        value = int(number) * scale
    if value >= 1 << 63:
        raise CommandError("Image size must be less than 8 EiB!")
    return value


def _parse_options(text: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for group in text:
        for item in group.split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            opts[key] = value if sep else "on"
    return opts


def _onoff(opts: dict[str, str], key: str) -> bool:
    value = opts.get(key, "off")
    if value not in ("on", "off", "true", "false", "yes", "no"):
        raise CommandError(f"Parameter '{key}' expects 'on' or 'off'")
    return value in ("on", "true", "yes")


#: qcow2 encryption options of ``create -o``, in the order qemu-img prints them.
_ENCRYPT_OPTIONS = ("encrypt.format", "encrypt.key-secret", "encrypt.hash-alg", "encrypt.iter-time")

_CREATE_OPTIONS = {
    "qcow2": (
        "cluster_size",
        "refcount_bits",
        "compat",
        "lazy_refcounts",
        "extended_l2",
        "compression_type",
        "backing_file",
        "backing_fmt",
        *_ENCRYPT_OPTIONS,
    ),
    "raw": (),
}


def _cmd_create(args: Arguments) -> int:
    """qemu-img create, in ``bdrv_img_create``'s order: options, backing file, size, the
    "Formatting" line, then the format's own validation."""
    from ..errors import OptionError, Qcow2Error
    from ..image import backing_path, open_chain
    from ..tools.info import sectors_size
    from .options import parse_secrets

    try:
        secrets = parse_secrets(args.object)  # qemu-img creates its objects first
    except OptionError as err:
        raise CommandError(str(err)) from err
    fmt = args.f or "raw"  # qemu-img's default format
    if fmt not in _CREATE_OPTIONS:
        raise CommandError(f"Unknown file format '{fmt}'")
    image = args.image
    given = _parse_options(args.o or [])
    for key in given:
        if key not in _CREATE_OPTIONS[fmt]:
            raise CommandError(f"{image}: Invalid parameter '{key}'")
    opts = dict(given)
    backing = args.b or opts.pop("backing_file", None)
    backing_fmt = args.F or opts.pop("backing_fmt", None)
    if fmt == "raw" and backing:
        raise CommandError(f"{image}: Backing file not supported for file format 'raw'")
    size = parse_size(args.size) if args.size is not None else None
    if backing:
        if backing == image:
            raise CommandError(
                f"{image}: Error: Trying to create an image with the same filename as the "
                "backing file"
            )
        full = backing_path(image, backing)
        try:
            # opened alone, without a lock, as bdrv_img_create opens it
            layer = open_chain(full, backing_fmt, force_share=True, mode="qemu", backing=False)
        except (Qcow2Error, OSError) as err:
            reason = getattr(err, "message", str(err))
            raise CommandError(f"{image}: {reason}\nCould not open backing image.") from err
        layer.close()
        if backing_fmt is None:
            raise CommandError(
                f"{image}: Backing file specified without backing format\n"
                f"Detected format of {layer.format}.",
                end="",
            )
        if size is None:
            size = sectors_size(layer)
    if size is None:
        raise CommandError(f"{image}: Image creation needs a size parameter")
    if fmt == "raw":
        if not args.q:
            sys.stdout.write(f"Formatting '{image}', fmt=raw size={size}\n")
        try:
            with open(image, "wb") as raw:
                raw.truncate(-(-size // 512) * 512)
        except OSError as err:
            raise CommandError(f"{image}: Could not create '{image}': {err.strerror}") from err
        return 0
    cluster_text = opts.pop("cluster_size", "65536")
    refcount_text = opts.pop("refcount_bits", "16")
    compat = opts.pop("compat", "1.1")
    compression = opts.pop("compression_type", "zlib")
    lazy = _onoff(opts, "lazy_refcounts")
    extended_l2 = _onoff(opts, "extended_l2")
    cluster_size = parse_size(cluster_text)
    encrypt = {key: opts.pop(key) for key in _ENCRYPT_OPTIONS if key in opts}
    _check_iter_time(encrypt, f"{image}: ")
    if not args.q:
        parts = [
            f"Formatting '{image}', fmt=qcow2",
            *(f"{key}={value}" for key, value in encrypt.items()),
            f"cluster_size={cluster_size}",
            f"extended_l2={'on' if extended_l2 else 'off'}",
            f"compression_type={compression}",
            f"size={size}",
        ]
        if "compat" in given:
            parts.append(f"compat={compat}")
        if backing:
            parts.append(f"backing_file={backing}")
        if backing_fmt:
            parts.append(f"backing_fmt={backing_fmt}")
        parts += [f"lazy_refcounts={'on' if lazy else 'off'}", f"refcount_bits={refcount_text}"]
        sys.stdout.write(" ".join(parts) + "\n")
    if compat not in ("0.10", "1.1", "v2", "v3"):
        raise CommandError(f"{image}: Parameter 'version' does not accept value '{compat}'")
    if compression not in ("zlib", "zstd"):
        raise CommandError(
            f"{image}: Parameter 'compression-type' does not accept value '{compression}'"
        )
    version = 2 if compat in ("0.10", "v2") else 3
    try:
        refcount_bits = int(refcount_text)
    except ValueError as err:
        raise CommandError(
            f"{image}: Parameter 'refcount_bits' expects a non-negative number below 2^64"
        ) from err
    _validate_qcow2_create(image, cluster_size, refcount_bits, version, lazy, extended_l2)
    if compression == "zstd" and version < 3:
        raise CommandError(
            f"{image}: Non-zlib compression type is only supported with compatibility level "
            "1.1 and above (use version=v3 or greater)"
        )
    kwargs: dict[str, object] = _encrypt_kwargs(image, encrypt, secrets)
    kwargs |= {
        "cluster_size": cluster_size,
        "refcount_bits": refcount_bits,
        "version": version,
        "backing_file": backing,
        "backing_format": backing_fmt,
        "extended_l2": extended_l2,
        "lazy_refcounts": lazy,
    }
    try:
        _api().create(image, size, compression_type=compression, **kwargs).close()
    except (Qcow2Error, OSError) as err:
        raise CommandError(f"{image}: {getattr(err, 'message', err)}") from err
    return 0


def _encrypt_kwargs(
    image: str, encrypt: dict[str, str], secrets: dict[str, bytes]
) -> dict[str, object]:
    """``qcow2.create`` arguments for the ``encrypt.*`` options (``qcow2_set_up_encryption``'s
    messages, after ``image: ``); empty without ``encrypt.format``."""
    if "encrypt.format" not in encrypt:
        return {}
    key_id = encrypt.get("encrypt.key-secret")
    if key_id is None:
        raise CommandError(f"{image}: Parameter 'encrypt.key-secret' is required for cipher")
    if key_id not in secrets:
        raise CommandError(f"{image}: No secret with id '{key_id}'")
    kwargs: dict[str, object] = {
        "encrypt_format": encrypt["encrypt.format"],
        "encrypt_key_secret": secrets[key_id],
    }
    if "encrypt.hash-alg" in encrypt:
        kwargs["encrypt_hash"] = encrypt["encrypt.hash-alg"]
    if "encrypt.iter-time" in encrypt:
        kwargs["encrypt_iter_time"] = int(encrypt["encrypt.iter-time"])
    return kwargs


def _check_iter_time(encrypt: dict[str, str], prefix: str) -> None:
    """qemu-img parses ``encrypt.iter-time`` with the options, before anything else."""
    value = encrypt.get("encrypt.iter-time")
    if value is not None and not value.removeprefix("-").isdigit():
        raise CommandError(f"{prefix}Parameter 'encrypt.iter-time' expects a number")


def _validate_qcow2_create(
    image: str, cluster_size: int, refcount_bits: int, version: int, lazy: bool, extl2: bool
) -> None:
    """``qcow2_co_create``'s checks, in its order and with its messages."""
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        raise CommandError(f"{image}: Cluster size must be a power of two between 512 and 2048k")
    v3_hint = "compatibility level 1.1 and above (use version=v3 or greater)"
    if version < 3 and lazy:
        raise CommandError(f"{image}: Lazy refcounts only supported with {v3_hint}")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise CommandError(
            f"{image}: Refcount width must be a power of two and may not exceed 64 bits"
        )
    if version < 3 and refcount_bits != 16:
        raise CommandError(
            f"{image}: Different refcount widths than 16 bits require compatibility level "
            "1.1 or above (use version=v3 or greater)"
        )
    if version < 3 and extl2:
        raise CommandError(f"{image}: Extended L2 entries are only supported with {v3_hint}")


def _cmd_resize(args: Arguments) -> int:
    qcow2 = _api()
    from ..errors import Qcow2Error

    text = args.size
    spec = _spec(args)
    try:
        image = qcow2.open(
            spec.path, writable=True, force_share=False, key_secret=spec.key, options=spec.options
        )
    except (Qcow2Error, OSError) as err:
        raise _open_error(spec.arg, err) from err
    with image:
        current = image.virtual_size
        if text[:1] in "+-":
            delta = parse_size(text[1:])
            new = current + delta if text[0] == "+" else current - delta
        else:
            new = parse_size(text)
        if new < 0:
            raise CommandError("New image size must be positive")
        new = (new + 511) // 512 * 512
        if new < current and not args.shrink:
            raise CommandError(
                "Use the --shrink option to perform a shrink operation.\n"
                f"{PROG}: warning: Shrinking an image will delete all data beyond the shrunken "
                "image's end. Before performing such an operation, make sure there is no "
                "important data there."
            )
        if image.version < 3 and image.snapshots:
            raise CommandError("Can't resize a v2 image which has snapshots")
        try:
            image.resize(new)
        except Qcow2Error as err:
            raise CommandError(err.message) from err
    sys.stdout.write("Image resized.\n")
    return 0


# Section: amend (compat and lazy_refcounts)


def _cmd_amend(args: Arguments) -> int:
    from ..errors import CorruptImageError, Qcow2Error, UnsupportedFeatureError
    from ..format.header import clear_unknown_autoclear, read_header
    from ..io.fileio import HostFile
    from ..io.lock import lock_image
    from ..overlap import parse_options as parse_overlap_options
    from ..tools.amend import amend_image

    if not args.o:
        raise CommandError("Must specify options (-o)")
    opts = _parse_options(args.o)
    compat = opts.pop("compat", None)
    lazy = _onoff(opts, "lazy_refcounts") if "lazy_refcounts" in opts else None
    opts.pop("lazy_refcounts", None)
    if opts:
        raise CommandError(
            f"Invalid parameter '{next(iter(opts))}' (this tool amends compat and "
            "lazy_refcounts only)"
        )
    if compat is not None and compat not in ("0.10", "v2", "1.1", "v3"):
        raise CommandError(f"Unknown compatibility level {compat}")
    version = None if compat is None else 2 if compat in ("0.10", "v2") else 3
    spec = _spec(args)
    try:
        f = HostFile(spec.path, writable=True)
    except (Qcow2Error, OSError) as err:
        raise _open_error(spec.arg, err) from err
    try:
        try:
            lock_image(f.fd, spec.path, writable=True)
            header = read_header(f, writable=True)
            checks = parse_overlap_options(spec.options)
            clear_unknown_autoclear(f, header)
        except Qcow2Error as err:
            raise _open_error(spec.arg, err) from err
        try:
            amend_image(f, header, version=version, lazy_refcounts=lazy, overlap_checks=checks)
        except UnsupportedFeatureError as err:
            raise CommandError(err.message) from err  # QEMU's refusal, as it words it
        except CorruptImageError as err:
            # QEMU's downgrade: what it found (a corruption event was printed already),
            # then why the zero clusters could not be expanded
            failed = f"Failed to turn zero into data clusters: {os.strerror(err.errno)}"
            if not err.signaled:
                failed = f"{err.message}\n{PROG}: {failed}"
            raise CommandError(failed) from err
        except Qcow2Error as err:
            raise CommandError(f"Error while amending options: {err.message}") from err
    finally:
        f.close()
    return 0


# Section: compare / convert (guest content)


def _open_source(spec: Any, snapshot: tuple[str, str] | None = None, *, force_share: bool) -> Any:
    """The :class:`~qcow2.tools.convert.GuestSource` of an image argument, opened as
    qemu-img opens it for I/O (an encrypted image needs its key)."""
    from ..errors import (
        CorruptImageError,
        EncryptionKeyError,
        Qcow2Error,
        SnapshotNotFoundError,
        UnsupportedFeatureError,
    )
    from ..image import Image, open_chain
    from ..tools.convert import GuestSource

    key = _key(spec) if spec.key_id is not None else None
    try:
        layer = open_chain(spec.path, spec.fmt, force_share=force_share, key_secret=key)
    except (Qcow2Error, OSError) as err:
        raise _open_error(spec.arg, err) from err
    try:
        if isinstance(layer, Image) and layer.encrypted and key is None:
            raise CommandError(f"Could not open '{spec.arg}': {EncryptionKeyError.MISSING_KEY}")
        return GuestSource(layer, snapshot)
    except SnapshotNotFoundError as err:
        layer.close()
        raise CommandError("Failed to load snapshot: Can't find snapshot") from err
    except (UnsupportedFeatureError, CorruptImageError) as err:
        # a snapshot of a raw image, or one whose L1 table QEMU refuses
        layer.close()
        raise CommandError(f"Failed to load snapshot: {err.message}") from err
    except BaseException:
        layer.close()
        raise


def _cmd_compare(args: Arguments) -> int:
    from ..errors import CorruptImageError

    try:
        a = _open_source(_spec(args, "image1"), force_share=args.U)
        try:
            b = _open_source(_spec(args, "image2", fmt=args.F), force_share=args.U)
        except BaseException:
            a.close()
            raise
    except CommandError as err:
        err.code = 2
        raise
    try:
        return _compare(args, a, b)
    except CorruptImageError as err:
        if not err.signaled:
            raise
        # QEMU meets broken metadata in its block-status query of one image
        name = args.image1 if err.path == a.layer.path else args.image2
        raise CommandError(f"Sector allocation test failed for {name}", code=3) from err
    finally:
        a.close()
        b.close()


def _compare(args: Arguments, a: Any, b: Any) -> int:
    from ..tools.convert import first_mismatch, first_nonzero

    try:
        mismatch = first_mismatch(a, b)
        if mismatch is None and a.size != b.size:
            if args.s:
                sys.stdout.write("Strict mode: Image size mismatch!\n")
                return 1
            sys.stdout.write("Warning: Image size mismatch!\n")
            mismatch = first_nonzero(a if a.size > b.size else b, min(a.size, b.size))
        if mismatch is not None:
            sys.stdout.write(f"Content mismatch at offset {mismatch}!\n")
            return 1
        sys.stdout.write("Images are identical.\n")
        return 0
    except CommandError as err:
        err.code = 2
        raise


def _cmd_convert(args: Arguments) -> int:
    from ..compress import CompressedWriter
    from ..errors import CorruptImageError, OptionError, Qcow2Error
    from ..tools.convert import copy_guest
    from .options import parse_secrets

    snapshot: tuple[str, str] | None = None
    if args.l:
        if args.l.startswith("snapshot."):
            opts = _parse_options([args.l])
            if "snapshot.id" in opts:
                snapshot = ("id", opts["snapshot.id"])
            elif "snapshot.name" in opts:
                snapshot = ("name", opts["snapshot.name"])
            else:
                raise CommandError(f"Invalid parameter '{args.l}'")
        else:
            snapshot = ("any", args.l)
    out_fmt = args.O or "raw"
    if out_fmt not in ("raw", "qcow2"):
        raise CommandError(f"Unknown file format '{out_fmt}'")
    if args.c and out_fmt != "qcow2":
        raise CommandError("Compression not supported for this file format")
    out_opts = _parse_options(args.o or [])
    out_encrypt = {key: out_opts.pop(key) for key in _ENCRYPT_OPTIONS if key in out_opts}
    _check_iter_time(out_encrypt, "")
    if args.c and "encrypt.format" in out_encrypt:
        raise CommandError("Compression and encryption not supported at the same time")
    try:
        secrets = parse_secrets(args.object)
    except OptionError as err:
        raise CommandError(str(err)) from err
    src = _open_source(_spec(args, "src"), snapshot, force_share=args.U)
    try:
        size = src.size
        writer: Callable[[int, bytes], object]
        out_image = None
        compressed = None
        if out_fmt == "raw":
            fd = os.open(args.dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, size)

            def writer(offset: int, data: bytes) -> None:
                os.pwrite(fd, data, offset)

        else:
            opts = out_opts
            where = f"{args.dst}: error while converting qcow2"
            try:
                out_image = _api().create(
                    args.dst,
                    size,
                    **_encrypt_kwargs(where, out_encrypt, secrets),
                    compression_type=opts.get("compression_type", "zlib"),
                    cluster_size=parse_size(opts.get("cluster_size", "65536")),
                    refcount_bits=int(opts.get("refcount_bits", "16")),
                    version=2 if opts.get("compat") in ("0.10", "v2") else 3,
                    extended_l2=_onoff(opts, "extended_l2"),
                    lazy_refcounts=_onoff(opts, "lazy_refcounts"),
                )
                compressed = CompressedWriter(out_image) if args.c else None
            except CommandError:
                raise
            except (Qcow2Error, OSError) as err:
                raise CommandError(f"{args.dst}: error while converting qcow2: {err}") from err
            writer = out_image.write
        at = [0]  # where the copy is (qemu-img names it when a write fails)
        try:
            shown = _Progress(size) if args.p and not args.q else None

            def progress(position: int, done: int) -> None:
                at[0] = position
                if shown is not None:
                    shown.update(done)

            copy_guest(src, writer, compressed=compressed, progress=progress)
            if shown is not None:
                shown.end()
        except Qcow2Error as err:
            if isinstance(err, CorruptImageError) and err.signaled and err.path == src.layer.path:
                # QEMU meets the source's broken metadata in its block-status query
                status_at = at[0] if err.guest_offset is None else err.guest_offset
                raise CommandError(
                    f"error while reading block status at offset {status_at}: Input/output error"
                ) from err
            raise CommandError(f"error while writing at byte {at[0]}: {err.message}") from err
        finally:
            if out_image is not None:
                out_image.close()
            else:
                os.close(fd)
    finally:
        src.close()
    return 0


class _Progress:
    """qemu-img's ``-p`` output: ``    (P/100%)\\r`` whenever P grew by 1%, then a final
    100% line ending in a newline."""

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.shown = 0.0
        self._print(0.0)

    def _print(self, percent: float) -> None:
        sys.stdout.write(f"    ({percent:.2f}/100%)\r")
        sys.stdout.flush()

    def update(self, done: int) -> None:
        percent = done * 100.0 / self.total
        if percent - self.shown >= 1.0:
            self.shown = percent
            self._print(percent)

    def end(self) -> None:
        self._print(100.0)
        sys.stdout.write("    (100.00/100%)\r\n")
        sys.stdout.flush()


# Section: argument parsing

_FORMATS = ("qcow2", "raw")
_OUTPUT = Option(
    "--output",
    kind="value",
    choices=("human", "json"),
    choices_error="--output must be used with human or json as argument.",
    help="output format",
)
_FORCE_SHARE = Option("-U", "--force-share", dest="U", help="open the image read-only, shared")
_QUIET = Option("-q", help="quiet: print no progress or results")
_OBJECT = Option(
    "--object",
    kind="append",
    metavar="secret,id=ID,data=PASS|file=PATH",
    help="a secret (the passphrase of an encrypted image)",
)
_IMAGE_OPTS = Option(
    "--image-opts",
    help="the image is driver=qcow2,file.filename=IMG,encrypt.key-secret=ID",
)
_ONE_IMAGE = "Expecting one image file name"


def _format(*choices: str) -> Option:
    return Option("-f", kind="value", choices=choices, help="image format")


def commands() -> list[Command]:
    """The subcommands with qemu-img's options (the --help text is generated from these)."""
    return [
        Command(
            "info",
            "show image information (qemu-img info)",
            _cmd_info,
            [
                _format(*_FORMATS),
                _FORCE_SHARE,
                Option("--backing-chain", help="also show the backing files"),
                _OUTPUT,
                _OBJECT,
                _IMAGE_OPTS,
            ],
            ["image"],
            _ONE_IMAGE,
        ),
        Command(
            "check",
            "check (and repair) the image (exit 0 clean, 1 failed, 2 corrupt, 3 leaks)",
            _cmd_check,
            [
                _format(*_FORMATS),
                _FORCE_SHARE,
                Option(
                    "-r",
                    kind="value",
                    choices=("leaks", "all"),
                    choices_error="Unknown option value for -r (expecting 'leaks' or 'all'): "
                    "{value}",
                    help="repair leaks, or everything",
                ),
                _QUIET,
                _OUTPUT,
                _OBJECT,
                _IMAGE_OPTS,
            ],
            ["image"],
            _ONE_IMAGE,
        ),
        Command(
            "snapshot",
            "list (-l), create (-c), apply (-a), delete (-d)",
            _cmd_snapshot,
            [
                _format("qcow2"),
                _FORCE_SHARE,
                _QUIET,
                Option("-l", help="list snapshots"),
                Option("-c", kind="value", metavar="TAG", help="create snapshot TAG"),
                Option("-a", kind="value", metavar="TAG", help="apply (revert to) snapshot TAG"),
                Option("-d", kind="value", metavar="TAG", help="delete snapshot TAG"),
                _OBJECT,
                _IMAGE_OPTS,
            ],
            ["image"],
            _ONE_IMAGE,
        ),
        Command(
            "map",
            "show guest-to-host mapping (qemu-img map)",
            _cmd_map,
            [
                _format(*_FORMATS),
                _FORCE_SHARE,
                Option("--start-offset", kind="value", metavar="OFFSET", help="first guest byte"),
                Option("--max-length", kind="value", metavar="LEN", help="guest bytes at most"),
                _OUTPUT,
                _OBJECT,
                _IMAGE_OPTS,
            ],
            ["image"],
            _ONE_IMAGE,
        ),
        Command(
            "create",
            "create a qcow2 (or raw) image",
            _cmd_create,
            [
                Option("-f", kind="value", metavar="FMT", help="qcow2 or raw (default: raw)"),
                Option("-o", kind="append", metavar="OPTIONS", help="cluster_size=, compat=..."),
                Option("-b", kind="value", metavar="BACKING", help="backing file"),
                Option("-F", kind="value", metavar="FMT", help="backing file format"),
                _QUIET,
                _OBJECT,
            ],
            ["image", "size?"],
            "Expecting image file name",
            "Unexpected argument: {extra}",
        ),
        Command(
            "resize",
            "change the virtual size ([+|-]SIZE)",
            _cmd_resize,
            [
                _format("qcow2"),
                _QUIET,
                Option("--shrink", help="allow shrinking"),
                _OBJECT,
                _IMAGE_OPTS,
            ],
            ["image", "size"],
            "Not enough arguments",
            "Expecting image file name and size",
        ),
        Command(
            "compare",
            "compare guest content (exit 0 same, 1 different, 2 error)",
            _cmd_compare,
            [
                _format(*_FORMATS),
                Option("-F", kind="value", choices=_FORMATS, help="format of the second image"),
                Option("-s", help="strict: sizes must match"),
                _QUIET,
                _FORCE_SHARE,
                _OBJECT,
                _IMAGE_OPTS,
            ],
            ["image1", "image2"],
            "Expecting two image file names",
        ),
        Command(
            "amend",
            "change the compat level (-o compat=0.10|1.1) or lazy_refcounts",
            _cmd_amend,
            [
                _format("qcow2"),
                Option("-o", kind="append", metavar="OPTIONS", help="compat=0.10 or compat=1.1"),
                _QUIET,
                _OBJECT,
                _IMAGE_OPTS,
            ],
            ["image"],
            "Expecting one image file name",
        ),
        Command(
            "convert",
            "copy guest content to a raw or qcow2 image",
            _cmd_convert,
            [
                _format(*_FORMATS),
                Option("-O", kind="value", choices=_FORMATS, help="output format"),
                Option("-o", kind="append", metavar="OPTIONS", help="output image options"),
                Option("-c", help="compress (qcow2 output)"),
                Option("-p", help="show progress"),
                _QUIET,
                _FORCE_SHARE,
                Option(
                    "-l",
                    kind="value",
                    metavar="SNAPSHOT",
                    help="snapshot.name=TAG, snapshot.id=ID or TAG",
                ),
                _OBJECT,
                _IMAGE_OPTS,
            ],
            ["src", "dst"],
            "Must specify image file name",
            "convert copies one source image (SRC DST)",
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qcow2`` console script; returns the exit code."""
    from ..errors import Qcow2Error

    for stream in (sys.stdout, sys.stderr):
        # Image names and snapshot tags are bytes on disk: write them back unchanged.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..errors import set_corruption_reporter

    # QEMU prints corruption events on stderr as they happen.
    set_corruption_reporter(_print_corruption)
    if (
        argv[:1] == ["resize"]
        and len(argv) >= 3
        and argv[-1][:1] == "-"
        and argv[-1][1:2].isdigit()
    ):
        argv[-1:-1] = ["--"]  # "-1M" is a size, not an option
    try:
        try:
            args = parse(commands(), argv, description=DESCRIPTION)
        except HelpRequested as help_text:
            sys.stdout.write(str(help_text))
            return 0
        if getattr(args, "q", False) and args.command != "snapshot":
            # -q: qemu-img's qprintf output is suppressed; findings and errors still show
            import contextlib

            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                code: int = args.func(args)
        else:
            code = args.func(args)
    except CommandError as err:
        # First line carries the "qemu-img:" prefix; hint lines follow verbatim.
        lines = str(err).splitlines() or [""]
        endings = ["\n"] * (len(lines) - 1) + [err.end]
        sys.stderr.write(f"{PROG}: {lines[0]}{endings[0]}")
        for line, ending in zip(lines[1:], endings[1:], strict=True):
            sys.stderr.write(line + ending)
        return err.code
    except Qcow2Error as err:
        _err(str(err))
        return 1
    except OSError as err:
        _err(f"{err.filename + ': ' if err.filename else ''}{err.strerror or err}")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the last resort: one line, never a traceback
        _err(f"internal error: {type(err).__name__}: {err}")
        return 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
