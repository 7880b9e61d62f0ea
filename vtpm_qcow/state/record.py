"""Small immutable records of the state layer (what ``@dataclass(frozen=True)`` made).

``vtpm-qcow info`` and ``snapshot -l`` import the state modules; ``import dataclasses``
alone costs 15-20 ms of their start-up (it imports ``inspect``, ``ast``, ``dis``).  A
record class names its fields in ``_FIELDS`` (also its ``__slots__``, plus any private
slots), and its ``__init__`` takes them positionally, in that order, and sets them once
through :meth:`Record._init`.  Equality, hash and repr are a frozen dataclass's;
assigning a field afterwards raises AttributeError.
:func:`vtpm_qcow.export.control.to_json` turns a record into a dict of its fields, as it
does a dataclass.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar


class Record:
    """Base of the records: fields from ``_FIELDS``, frozen after ``__init__``."""

    __slots__ = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def _init(self, *values: object) -> None:
        """Set the fields (all of ``_FIELDS``, in order) once, from ``__init__``."""
        for name, value in zip(self._FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields, in order."""
        return cls._FIELDS

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of {type(self).__name__}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            assert isinstance(other, Record)
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __reduce__(self) -> tuple[type[Record], tuple[object, ...]]:
        """Copies and pickles call ``__init__`` with the fields."""
        return (type(self), self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"{type(self).__qualname__}({fields})"


__all__ = ["Record"]
