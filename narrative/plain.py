"""Plain record classes: what ``@dataclass`` gave the store's records, without its import.

Importing :mod:`dataclasses` imports :mod:`inspect` (and with it ``ast``, ``dis``,
``tokenize``), and the decorator then generates each class's methods with ``exec``: together
~14 ms of CPU in every process that opens a store (``python -c 'import narrative.store'``,
min of 25: 46.7 -> 33.0 ms without them). A record lists its fields in ``FIELDS`` (in the order
of its ``__init__`` parameters) and writes its own typed ``__init__``; these bases give value
equality, ``repr``, :meth:`Record.replace`, and for :class:`Frozen` records immutability,
hashing, copying and pickling.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Any, Self

__all__ = ["Frozen", "Record"]


class Record:
    """A mutable record: equal by value, unhashable (like a ``@dataclass``)."""

    __slots__ = ()
    FIELDS: tuple[str, ...] = ()

    def values(self) -> tuple[object, ...]:
        """The field values, in ``FIELDS`` order."""
        return tuple(getattr(self, name) for name in self.FIELDS)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (like :func:`dataclasses.replace`)."""
        unknown = changes.keys() - set(self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        fields = {name: getattr(self, name) for name in self.FIELDS}
        fields.update(changes)
        return type(self)(**fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self.values() == other.values()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({shown})"


class Frozen(Record):
    """An immutable record: its ``__init__`` sets the fields with :meth:`set_fields`."""

    __slots__ = ()

    def set_fields(self, *values: object) -> None:
        """Set every field, in ``FIELDS`` order (only ``__init__`` may)."""
        for name, value in zip(self.FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a {type(self).__name__}")

    def __hash__(self) -> int:  # type: ignore[override]  # hashable again: immutable
        return hash(self.values())

    def __reduce__(self) -> tuple[type[Self], tuple[object, ...]]:
        # copy, deepcopy and pickle rebuild it through __init__, not by setting attributes
        return type(self), self.values()
