"""Media at rest on the device: AES-256-GCM in independently authenticated blocks.

A copy of the buffer taken off a device (a lost or stolen camera, a copied SD card)
reveals nothing without the device's data key, and any change to a buffered file is
detected before a single byte of it is uploaded.

File layout::

    "CSTDYv1\\0" | file_id (8 random bytes) | block_size (u32 BE)      -- header, 20 bytes
    block 0: ciphertext || tag(16)
    block 1: ...

Block ``i`` uses nonce ``file_id || i`` (u32 BE): unique for the key as long as file ids
do not collide (64 random bits per file) and a file has < 2**32 blocks — so a nonce is
never reused. Each block's associated data is the header, ``i``, and a final-block flag,
so blocks cannot be reordered, moved between files, or cut off at the end unnoticed.
Blocks let the relay decrypt exactly the chunk it is about to send (random access),
with memory bounded by one block. The outbox seals in blocks of the upload chunk size
(at most 1 MiB, ``Outbox.seal_block``), so a chunk is one read and one decryption; the
block size is in the header, so files sealed with another size (64 KiB before, or a chunk
size since changed) read the same way, and the reader keeps its last block for reads
smaller than one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"CSTDYv1\0"
HEADER = struct.Struct(">8s8sI")
TAG = 16
BLOCK_SIZE = 64 * 1024
#: The largest block a header may claim. The header is authenticated only with the first
#: block, which is read by the size the header gives: a flipped high bit asked for
#: gigabytes (a MemoryError on a small device, not the ``CorruptMedia`` it is).
#: 8 MiB: releases before 2026-11-27 sealed in blocks of the chunk size, up to 8 MiB.
MAX_BLOCK_SIZE = 8 * 1024 * 1024


class CorruptMedia(Exception):
    """A buffered file failed authentication: altered, truncated, or not ours."""


def sealed_file_id(header: bytes) -> bytes:
    """The random id in a sealed file's header (what ties the file to its capture)."""
    magic, file_id, _ = HEADER.unpack(header[: HEADER.size])
    if magic != MAGIC:
        raise CorruptMedia("not a sealed media header")
    return bytes(file_id)


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">I?", index, final)


def _nonce(file_id: bytes, index: int) -> bytes:
    return file_id + struct.pack(">I", index)


def seal_blocks(
    key: bytes, chunks: Iterable[bytes], block_size: int = BLOCK_SIZE
) -> Iterator[bytes]:
    """Encrypt a stream of plaintext pieces into the sealed file format, block by block."""
    if not 0 < block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be 1..{MAX_BLOCK_SIZE}, not {block_size}")
    aes = AESGCM(key)
    file_id = os.urandom(8)
    header = HEADER.pack(MAGIC, file_id, block_size)
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
            yield aes.encrypt(_nonce(file_id, index), block, _aad(header, index, False))
            index += 1
        del pending[: ready * block_size]
    yield aes.encrypt(_nonce(file_id, index), bytes(pending), _aad(header, index, True))


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
        self._aes = AESGCM(key)
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._last: tuple[int, bytes] | None = None
        try:
            self.info = self._read_info()
        except BaseException:
            self._file.close()
            raise

    def _read_info(self) -> SealedInfo:
        header = self._file.read(HEADER.size)
        if len(header) != HEADER.size:
            raise CorruptMedia(f"{self.path.name}: too short for a sealed file")
        magic, file_id, block_size = HEADER.unpack(header)
        if magic != MAGIC or not 0 < block_size <= MAX_BLOCK_SIZE:
            raise CorruptMedia(f"{self.path.name}: not a sealed media file (bad header)")
        body = os.fstat(self._file.fileno()).st_size - HEADER.size
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
        start = HEADER.size + index * (info.block_size + TAG)
        data = os.pread(self._file.fileno(), info.block_size + TAG, start)
        final = index == info.blocks - 1
        try:
            return self._aes.decrypt(
                _nonce(info.file_id, index), data, _aad(info.header, index, final)
            )
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
