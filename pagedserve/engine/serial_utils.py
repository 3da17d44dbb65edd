"""msgspec encoding for everything that crosses a process boundary (no pickle on the hot path).

msgspec handles structs, dataclasses, enums, sets and the builtin containers natively; numpy
arrays travel as a msgpack extension (dtype, shape, raw bytes) without a copy on the encode side.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

_NDARRAY_EXT = 1


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        header = msgspec.msgpack.encode((array.dtype.str, array.shape))
        return msgspec.msgpack.Ext(_NDARRAY_EXT, len(header).to_bytes(4, "little") + header + array.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode objects of type {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _NDARRAY_EXT:
        raise NotImplementedError(f"unknown msgpack extension {code}")
    header_len = int.from_bytes(data[:4], "little")
    dtype, shape = msgspec.msgpack.decode(data[4 : 4 + header_len])
    # copy: the message buffer is reused by zmq once this frame is released
    return np.frombuffer(data[4 + header_len :], dtype=np.dtype(dtype)).reshape(shape).copy()


class MsgpackEncoder:
    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)

    def encode(self, obj: Any) -> bytes:
        return self._encoder.encode(obj)


class MsgpackDecoder:
    """Decodes into `type_` (a struct, dataclass or container type; Any for untyped)."""

    def __init__(self, type_: Any = Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(type_, ext_hook=_ext_hook, dec_hook=_dec_hook)

    def decode(self, data: bytes | memoryview) -> Any:
        return self._decoder.decode(data)


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is np.ndarray:
        return obj  # already built by the ext hook
    raise NotImplementedError(f"cannot decode objects of type {type_}")
