"""Prompt token ids as a packed array, and how they travel in MessagePack.

On the wire a ``TokenIds`` is a MessagePack **bin** holding the ids as consecutive little-endian unsigned 32-bit
integers (4 bytes per token, no header); ``dec_hook`` also accepts a plain MessagePack array of integers. Used by
``zdyn.protocol``'s encoder and decoders.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from typing import Any, cast


class TokenIds(array):  # type: ignore[type-arg]
    """Token ids as a packed array of unsigned 32-bit integers (a sequence of ints: ``len``, index, iterate,
    ``tolist()``; equal to a list of the same ids). On the wire: a bin of little-endian uint32 (see above)."""

    __slots__ = ()

    def __new__(cls, ids: Iterable[int] | bytes | bytearray | memoryview = ()) -> TokenIds:
        self = cast(TokenIds, super().__new__(cls, "I"))
        if isinstance(ids, bytes | bytearray | memoryview):
            self.frombytes(ids)
            if _BIG_ENDIAN:
                self.byteswap()
        elif isinstance(ids, list):
            self.fromlist(ids)
        else:
            self.extend(ids)
        return self

    def max_id(self) -> int:
        """The largest id (-1 when empty), at C speed (``max()`` would make an int object per id)."""
        if not self:
            return -1
        try:
            import numpy as np
        except ImportError:  # numpy comes with transformers; without it, the slow way
            return int(max(self))
        return int(np.frombuffer(self, dtype=np.uint32).max())

    def packed(self) -> bytes:
        """The wire form: little-endian uint32, 4 bytes per id."""
        if not _BIG_ENDIAN:
            return self.tobytes()
        swapped = array("I", self)
        swapped.byteswap()
        return swapped.tobytes()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list | tuple):
            return len(self) == len(other) and self.tolist() == list(other)
        return super().__eq__(other)

    __hash__ = None

    def __getitem__(self, key: Any) -> Any:  # a slice stays TokenIds (array's own would be a plain array)
        item = super().__getitem__(key)
        return TokenIds(item) if isinstance(key, slice) else item

    def __add__(self, other: Iterable[int]) -> TokenIds:
        out = TokenIds(self)
        out.extend(other)
        return out

    def __radd__(self, other: Iterable[int]) -> TokenIds:
        return TokenIds(other) + self

    def __repr__(self) -> str:
        return f"TokenIds({self.tolist()})"

    def __reduce__(self) -> tuple[type[TokenIds], tuple[bytes]]:
        return TokenIds, (self.packed(),)


_BIG_ENDIAN = sys.byteorder == "big"
assert array("I").itemsize == 4, "TokenIds needs a 4-byte unsigned int"


def as_token_ids(ids: Iterable[int]) -> TokenIds:
    """``ids`` as ``TokenIds`` (itself when it already is)."""
    return ids if isinstance(ids, TokenIds) else TokenIds(ids)


def enc_hook(obj: Any) -> Any:
    if isinstance(obj, TokenIds):
        return obj.packed()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def dec_hook(kind: type, obj: Any) -> Any:
    if kind is TokenIds:
        if isinstance(obj, bytes):
            if len(obj) % 4:
                raise ValueError(f"packed token ids need a multiple of 4 bytes, got {len(obj)}")
            return TokenIds(obj)
        if isinstance(obj, list):
            try:
                return TokenIds(obj)
            except (OverflowError, TypeError) as e:
                raise ValueError(f"token ids must be integers in [0, 2**32): {e}") from None
        raise TypeError(f"expected packed token ids (bin) or an array of ints, got {type(obj).__name__}")
    raise NotImplementedError(f"cannot decode {kind}")
