"""The transparency log: an RFC 9162 Merkle tree over everything the gateway accepted.

Leaves are canonical JSON (``protocol.receipt.record_leaf`` / ``evidence_leaf``) stored in
``log_leaves``; their hashes are also kept in memory so proofs need no database scan.
Anyone holding a signed tree head can ask for an inclusion proof of any leaf, or a
consistency proof between two tree heads, and so check that nothing was removed or
rewritten after the fact (Art. 18, Art. 34).

Leaves are appended inside the caller's transaction; if that transaction rolls back the
caller must call ``reload``. Never delete or update a leaf.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import overload

import sqlite_utils

from protocol import merkle
from protocol.receipt import SignedTreeHead
from protocol.signing import SigningKey


class TransparencyLog:
    def __init__(self, db: sqlite_utils.Database, key: SigningKey) -> None:
        self.db = db
        self.key = key
        self.hashes: list[bytes] = []
        self.frontier = merkle.MerkleFrontier()
        self.subtrees = merkle.SubtreeCache()
        self.reload()

    def reload(self) -> None:
        rows = self.db.execute("SELECT leaf_hash FROM log_leaves ORDER BY idx").fetchall()
        self.hashes = [bytes(r[0]) for r in rows]
        self.frontier = merkle.MerkleFrontier.from_leaf_hashes(self.hashes)
        # A rolled-back append may have cached subtrees over leaves that are gone.
        self.subtrees = merkle.SubtreeCache()

    @property
    def size(self) -> int:
        return len(self.hashes)

    def append(self, conn: sqlite3.Connection, leaf: bytes, now_ms: int) -> int:
        h = merkle.leaf_hash(leaf)
        index = self.frontier.append(h)
        self.hashes.append(h)
        conn.execute(
            "INSERT INTO log_leaves(idx, leaf_hash, leaf, created_ms) VALUES (?, ?, ?, ?)",
            [index, h, leaf.decode(), now_ms],
        )
        return index

    def tree_head(self, now_ms: int) -> SignedTreeHead:
        return SignedTreeHead(self.size, self.frontier.root(), now_ms).signed(self.key)

    def inclusion(self, index: int, tree_size: int | None = None) -> list[bytes]:
        size = self.size if tree_size is None else tree_size
        return merkle.inclusion_proof(index, _Prefix(self.hashes, size), self.subtrees)

    def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        return merkle.consistency_proof(old_size, _Prefix(self.hashes, new_size), self.subtrees)

    def root_at(self, tree_size: int) -> bytes:
        return merkle.root_from_leaf_hashes(self.hashes[:tree_size])


class _Prefix(Sequence[bytes]):
    """The first ``size`` leaf hashes, without copying the list for every proof."""

    def __init__(self, hashes: list[bytes], size: int) -> None:
        if not 0 <= size <= len(hashes):
            raise merkle.MerkleError(f"tree_size {size} is not in [0, {len(hashes)}]")
        self._hashes = hashes
        self._size = size

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return self._hashes[: self._size][index]
        if not -self._size <= index < self._size:
            raise IndexError(index)
        return self._hashes[index % self._size]
