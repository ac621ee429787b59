"""Media at rest on the device: AES-256-GCM in independently authenticated blocks.

A copy of the buffer taken off a device (a lost or stolen camera, a copied SD card)
reveals nothing without the device's data key, and any change to a buffered file is
detected before a single byte of it is uploaded.

File layout (version 2, written since 2026-11-27)::

    "CSTDYv2\\0" | salt (16 random bytes) | block_size (u32 BE)        -- header, 28 bytes
    block 0: ciphertext || tag(16)
    block 1: ...

Each file has a key of its own, HKDF-SHA256 of the device's data key with the file's salt,
and block ``i`` uses nonce ``0 (8 bytes) || i`` (u32 BE) under it: unique within the file,
and a key is shared by two files only if two 128-bit salts collide — so a nonce is never
reused, for as many files as a device will ever write. (Version 1 used the data key
itself with nonce ``file_id || i`` and a 64-bit random file id: for a given key, the odds
of two files colliding passed NIST's 2**-32 for random nonces after some 90,000 files,
a month of a camera's segments. Version 1 files still read.)

Each block's associated data is the header, ``i``, and a final-block flag, so blocks
cannot be reordered, moved between files, or cut off at the end unnoticed. Blocks let the
relay decrypt exactly the chunk it is about to send (random access), with memory bounded
by one block. The outbox seals in blocks of the upload chunk size (at most 1 MiB,
``Outbox.seal_block``), so a chunk is one read and one decryption; the block size is in
the header, so files sealed with another size (64 KiB before, or a chunk size since
changed) read the same way, and the reader keeps its last block for reads smaller than one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC_V1 = b"CSTDYv1\0"
HEADER_V1 = struct.Struct(">8s8sI")  # magic, file id, block size
MAGIC = b"CSTDYv2\0"
HEADER = struct.Struct(">8s16sI")  # magic, salt, block size
LAYOUTS = {MAGIC: HEADER, MAGIC_V1: HEADER_V1}
TAG = 16
BLOCK_SIZE = 64 * 1024
#: The largest block a header may claim. The header is authenticated only with the first
#: block, which is read by the size the header gives: a flipped high bit asked for
#: gigabytes (a MemoryError on a small device, not the ``CorruptMedia`` it is).
#: 8 MiB: releases before 2026-11-27 sealed in blocks of the chunk size, up to 8 MiB.
MAX_BLOCK_SIZE = 8 * 1024 * 1024


class CorruptMedia(Exception):
    """A buffered file failed authentication: altered, truncated, or not ours."""


def _parse_header(header: bytes) -> tuple[struct.Struct, bytes, int]:
    """(layout, file id or salt, block size) of a header of either version."""
    layout = LAYOUTS.get(header[:8])
    if layout is None or len(header) < layout.size:
        raise CorruptMedia("not a sealed media header")
    _, file_id, block_size = layout.unpack(header[: layout.size])
    return layout, bytes(file_id), block_size


def sealed_file_id(header: bytes) -> bytes:
    """The random id (the salt, since version 2) in a sealed file's header: what ties
    the file to its capture."""
    return _parse_header(header)[1]


def _file_cipher(key: bytes, header: bytes) -> tuple[AESGCM, Callable[[int], bytes]]:
    """The cipher and the nonce for block ``i`` of the file with this header."""
    layout, file_id, _ = _parse_header(header)
    if layout is HEADER_V1:
        return AESGCM(key), lambda index: file_id + struct.pack(">I", index)
    file_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=file_id, info=b"custody sealed media v2"
    ).derive(key)
    return AESGCM(file_key), lambda index: bytes(8) + struct.pack(">I", index)


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">I?", index, final)


def seal_blocks(
    key: bytes, chunks: Iterable[bytes], block_size: int = BLOCK_SIZE
) -> Iterator[bytes]:
    """Encrypt a stream of plaintext pieces into the sealed file format, block by block."""
    if not 0 < block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be 1..{MAX_BLOCK_SIZE}, not {block_size}")
    header = HEADER.pack(MAGIC, os.urandom(16), block_size)
    aes, nonce = _file_cipher(key, header)
    yield header
    pending = bytearray()
    index = 0
    for piece in chunks:
        pending += piece
        # Keep the last (possibly full) block back: only at the end do we know which
        # block is final.
        ready = (len(pending) - 1) // block_size if pending else 0
        for k in range(ready):
            block = bytes(pending[k * block_size : (k + 1) * block_size])
            yield aes.encrypt(nonce(index), block, _aad(header, index, False))
            index += 1
        del pending[: ready * block_size]
    yield aes.encrypt(nonce(index), bytes(pending), _aad(header, index, True))


@dataclass(frozen=True)
class SealedInfo:
    header: bytes
    file_id: bytes
    block_size: int
    blocks: int
    size: int  # plaintext bytes


class SealedReader:
    """Random-access decryption of a sealed file; every byte read is authenticated."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._last: tuple[int, bytes] | None = None
        try:
            self.info = self._read_info()
            self._aes, self._nonce = _file_cipher(key, self.info.header)
        except BaseException:
            self._file.close()
            raise

    def _read_info(self) -> SealedInfo:
        header = self._file.read(max(h.size for h in LAYOUTS.values()))
        layout = LAYOUTS.get(header[:8])
        if len(header) < (layout or HEADER_V1).size:
            raise CorruptMedia(f"{self.path.name}: too short for a sealed file")
        if layout is None:
            raise CorruptMedia(f"{self.path.name}: not a sealed media file (bad header)")
        header = header[: layout.size]
        _, file_id, block_size = layout.unpack(header)
        if not 0 < block_size <= MAX_BLOCK_SIZE:
            raise CorruptMedia(f"{self.path.name}: not a sealed media file (bad header)")
        body = os.fstat(self._file.fileno()).st_size - layout.size
        full, rest = divmod(body, block_size + TAG)
        if rest and rest < TAG:
            raise CorruptMedia(f"{self.path.name}: truncated inside a block")
        blocks = full + (1 if rest else 0)
        if blocks == 0:
            raise CorruptMedia(f"{self.path.name}: has no blocks")
        size = body - blocks * TAG
        return SealedInfo(header, file_id, block_size, blocks, size)

    @property
    def size(self) -> int:
        return self.info.size

    def _block(self, index: int) -> bytes:
        # The last block read is kept: reads smaller than a block (a chunk size lowered
        # since the file was sealed, a resume mid-block) then decrypt each block once.
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        block = self._decrypt_block(index)
        self._last = (index, block)
        return block

    def _decrypt_block(self, index: int) -> bytes:
        info = self.info
        start = len(info.header) + index * (info.block_size + TAG)
        data = os.pread(self._file.fileno(), info.block_size + TAG, start)
        final = index == info.blocks - 1
        try:
            return self._aes.decrypt(self._nonce(index), data, _aad(info.header, index, final))
        except InvalidTag as exc:
            raise CorruptMedia(
                f"{self.path.name}: block {index} failed authentication (altered on the device)"
            ) from exc

    def pread(self, length: int, offset: int) -> bytes:
        """Plaintext ``[offset, offset + length)``, like ``os.pread``."""
        bs = self.info.block_size
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        parts: list[bytes | memoryview] = []
        for index in range(offset // bs, (end - 1) // bs + 1):
            block = self._block(index)
            lo = max(offset - index * bs, 0)
            hi = min(end - index * bs, len(block))
            parts.append(block if lo == 0 and hi == len(block) else memoryview(block)[lo:hi])
        # One copy at most: the relay reads a chunk of several blocks for every send.
        only = parts[0]
        return only if len(parts) == 1 and isinstance(only, bytes) else b"".join(parts)

    def blocks(self) -> Iterator[bytes]:
        for index in range(self.info.blocks):
            yield self._block(index)

    def close(self) -> None:
        self._last = None
        self._file.close()

    def __enter__(self) -> SealedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainReader:
    """The same interface over an unencrypted file (devices enrolled without a data key)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.size = os.fstat(self._file.fileno()).st_size

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset)

    def blocks(self) -> Iterator[bytes]:
        while block := self._file.read(1024 * 1024):
            yield block

    def close(self) -> None:
        self._file.close()


MediaReader = SealedReader | PlainReader


def open_media(path: Path, key: bytes | None) -> MediaReader:
    return SealedReader(path, key) if key is not None else PlainReader(path)


class RecordCipher:
    """AES-GCM for small things at rest (journal records): nonce (random 96 bits) || ct."""

    PREFIX = b"\x01"

    def __init__(self, key: bytes) -> None:
        self._aes = AESGCM(key)

    def seal(self, data: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return self.PREFIX + nonce + self._aes.encrypt(nonce, data, context)

    def open(self, blob: bytes, context: bytes) -> bytes:
        if not blob.startswith(self.PREFIX) or len(blob) < 1 + 12 + TAG:
            raise CorruptMedia("stored record is not sealed")
        try:
            return self._aes.decrypt(blob[1:13], blob[13:], context)
        except InvalidTag as exc:
            raise CorruptMedia("stored record failed authentication (altered)") from exc
