"""How values are stored: JSON in and out (``dumps``/``loads``), embeddings packed.

A value is stored as JSON text. Embeddings are the exception worth making: 768 floats
as JSON digits take ~15 KB, and their shortest ``repr`` is long even for float32 model
outputs (``0.10000000149011612``). An embedding of at least :data:`PACK_MIN_LENGTH`
numbers is stored as ``{"f32": "<base64>"}`` when every value survives a float32 round
trip exactly (what models produce: 4 bytes a number) or ``{"f64": "<base64>"}``
otherwise (8 bytes a number) -- still JSON text, never pickle, and lossless either way.
Readers get the same list of floats back; plain JSON lists (short embeddings, and data
stored before packing existed) read as they always did. Exports (``Variable.to_dict``)
keep the plain list.
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

import orjson

from dspex_tasks.errors import ValidationFailed
from dspex_tasks.types import decode_value, encode_value

__all__ = ["PACK_MIN_LENGTH", "decode_stored", "dumps", "encode_stored", "loads"]

#: Shorter embeddings stay plain JSON lists (packing saves little and reads worse).
PACK_MIN_LENGTH = 16
_BIG_ENDIAN = sys.byteorder == "big"


def _pack(code: str, values: list[float]) -> str | None:
    packed: array[float] = array(code, values)
    if code == "f" and packed.tolist() != values:
        return None  # not exactly float32: the caller packs float64
    if _BIG_ENDIAN:
        packed.byteswap()  # stored little-endian on every host
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _unpack(code: str, text: str) -> list[float]:
    packed: array[float] = array(code)
    packed.frombytes(base64.b64decode(text, validate=True))
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tolist()


def encode_stored(type_name: str, value: Any) -> Any:
    """The JSON-safe form a normalized value is stored in."""
    if type_name == "embedding" and isinstance(value, list) and len(value) >= PACK_MIN_LENGTH:
        f32 = _pack("f", value)
        return {"f32": f32} if f32 is not None else {"f64": _pack("d", value)}
    return encode_value(type_name, value)


def decode_stored(type_name: str, stored: Any) -> Any:
    """Inverse of :func:`encode_stored` (and of plain :func:`encode_value` data)."""
    if type_name == "embedding" and isinstance(stored, dict) and len(stored) == 1:
        if "f32" in stored:
            return _unpack("f", stored["f32"])
        if "f64" in stored:
            return _unpack("d", stored["f64"])
    return decode_value(type_name, stored)


def dumps(value: Any) -> bytes:
    """JSON-encode ``value``; anything JSON cannot carry is a ``ValidationFailed``."""
    try:
        return orjson.dumps(value)
    except TypeError as e:
        raise ValidationFailed(f"value is not JSON-serializable: {e}", {"rule": "json"}) from e


def loads(raw: str | bytes) -> Any:
    return orjson.loads(raw)
