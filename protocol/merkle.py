"""RFC 9162 (Certificate Transparency v2, section 2.1) Merkle tree algorithms.

This module is the arithmetic behind the gateway's append-only transparency log. Every accepted
evidence record becomes one leaf; the gateway signs tree heads (size + root hash). Anyone holding
a signed tree head can then check, without trusting the gateway:

* that a given record is in the log (an *inclusion proof*, RFC 9162 2.1.3), and
* that a later tree head extends an earlier one, i.e. nothing that was in the log at the earlier
  size has been removed, reordered or rewritten since (a *consistency proof*, RFC 9162 2.1.4).

Hashing follows RFC 9162 exactly (SHA-256, ``0x00`` prefix for leaves, ``0x01`` for interior
nodes, the "largest power of two strictly less than n" split), so proofs produced here check out
with any other RFC 6962 / RFC 9162 implementation and vice versa.

This module must never do I/O: no files, no sockets, no clocks, no logging, no randomness, and no
module-level mutable state. Everything is a pure function of its arguments (``MerkleFrontier``
only mutates its own instance). Storage, signing and transport live elsewhere.

Conventions:

* "leaf hashes" are already-hashed leaves, i.e. ``leaf_hash(entry)`` values, 32 bytes each.
* Proof *generators* (``inclusion_proof``, ``consistency_proof``) raise ``MerkleError`` on invalid
  arguments, because a bad argument there is a bug in the caller.
* Proof *verifiers* (``verify_inclusion``, ``verify_consistency``) never raise on bad input: any
  mismatch, out-of-range index or size, wrong proof length or wrongly sized hash returns
  ``False``, because their input comes from whoever is being checked.
* ``old_size == 0`` in a consistency check: RFC 9162 only defines consistency proofs for
  ``0 < m < n``. The empty tree is a prefix of every tree, so here it is consistent with any new
  tree, but only with an *empty* proof and only if ``old_root`` really is the empty-tree root
  (``EMPTY_ROOT``); a non-empty proof or any other ``old_root`` is rejected. (Some
  implementations ignore ``old_root`` when ``old_size == 0``; we do not, since a size-0 tree head
  carrying a different root is itself malformed.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Self

__all__ = [
    "EMPTY_ROOT",
    "MerkleError",
    "MerkleFrontier",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

_HASH_SIZE = 32
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()
"""MTH({}) — the root of the empty tree: SHA-256 of the empty string (RFC 9162 2.1.1)."""


class MerkleError(ValueError):
    """Invalid arguments to a proof generator, root computation or ``MerkleFrontier``."""


def leaf_hash(data: bytes) -> bytes:
    """``MTH({d}) = SHA-256(0x00 || d)``: the hash of one log entry."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


# --------------------------------------------------------------------------------------------
# Internal helpers
# --------------------------------------------------------------------------------------------


def _split(n: int) -> int:
    """The largest power of two strictly less than ``n`` (``n >= 2``), RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaf_hashes(leaf_hashes: Sequence[bytes]) -> None:
    for i, h in enumerate(leaf_hashes):
        if len(h) != _HASH_SIZE:
            raise MerkleError(
                f"leaf_hashes[{i}] must be a {_HASH_SIZE}-byte hash, got {len(h)} bytes"
            )


def _fold(stack: Sequence[bytes]) -> bytes:
    """Root of a tree given its perfect-subtree roots, largest (leftmost) first.

    For ``n = 2^a + 2^b + ...`` (``a > b > ...``) RFC 9162's recursive split gives
    ``MTH = node(P_a, node(P_b, ...))``, so the fold runs right to left.
    """
    if not stack:
        return EMPTY_ROOT
    root = stack[-1]
    for h in reversed(stack[:-1]):
        root = node_hash(h, root)
    return root


def _range_root(leaf_hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """``MTH(D[lo:hi])`` computed iteratively in O(hi - lo) hashes, without slicing."""
    stack: list[bytes] = []
    for count, i in enumerate(range(lo, hi)):
        h = leaf_hashes[i]
        # Each trailing 1-bit of ``count`` is a complete subtree of equal size to merge with.
        while count & 1:
            h = node_hash(stack.pop(), h)
            count >>= 1
        stack.append(h)
    return _fold(stack)


# --------------------------------------------------------------------------------------------
# Tree hash and proof generation
# --------------------------------------------------------------------------------------------


def root_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
    """``MTH(D[n])`` over already-hashed leaves; ``EMPTY_ROOT`` for no leaves."""
    _check_leaf_hashes(leaf_hashes)
    return _range_root(leaf_hashes, 0, len(leaf_hashes))


class SubtreeCache:
    """Roots of complete, aligned subtrees of an append-only log.

    Such a subtree never changes once its leaves exist, so a log that keeps one of these
    answers inclusion and consistency proofs in O(log² n) hashes once warm, instead of
    rehashing every leaf for every receipt. Only for leaf sequences that are only ever
    appended to (the caller's promise).
    """

    SMALL = 16  # below this, hashing directly is cheaper than bookkeeping

    def __init__(self) -> None:
        self._roots: dict[tuple[int, int], bytes] = {}

    def root(self, leaf_hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
        n = hi - lo
        if n <= self.SMALL:
            return _range_root(leaf_hashes, lo, hi)
        if n & (n - 1) == 0 and lo % n == 0:
            cached = self._roots.get((lo, hi))
            if cached is None:
                mid = lo + n // 2
                cached = node_hash(self.root(leaf_hashes, lo, mid), self.root(leaf_hashes, mid, hi))
                self._roots[(lo, hi)] = cached
            return cached
        k = _split(n)
        return node_hash(self.root(leaf_hashes, lo, lo + k), self.root(leaf_hashes, lo + k, hi))


def inclusion_proof(
    index: int, leaf_hashes: Sequence[bytes], cache: SubtreeCache | None = None
) -> list[bytes]:
    """``PATH(index, D[n])`` (RFC 9162 2.1.3.1) for the tree of size ``n = len(leaf_hashes)``.

    Ordered from the leaf's sibling up to the sibling of the root's child, as the RFC
    specifies. The proof for a one-leaf tree is empty.

    Raises ``MerkleError`` if ``index`` is not in ``[0, n)``.
    """
    n = len(leaf_hashes)
    if n == 0:
        raise MerkleError(f"index {index} out of range: the tree is empty (tree_size 0)")
    if not 0 <= index < n:
        raise MerkleError(f"index {index} out of range for tree_size {n} (need 0 <= index < {n})")
    if cache is None:
        _check_leaf_hashes(leaf_hashes)
    range_root = _range_root if cache is None else cache.root

    # Walk down from the root; record the sibling subtree at each level, top first.
    top_down: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:
        mid = lo + _split(hi - lo)
        if index < mid:
            top_down.append(range_root(leaf_hashes, mid, hi))
            hi = mid
        else:
            top_down.append(range_root(leaf_hashes, lo, mid))
            lo = mid
    top_down.reverse()
    return top_down


def consistency_proof(
    old_size: int, leaf_hashes: Sequence[bytes], cache: SubtreeCache | None = None
) -> list[bytes]:
    """``PROOF(old_size, D[n])`` (RFC 9162 2.1.4.1), ``n = len(leaf_hashes)``.

    Proves that the tree of the first ``old_size`` leaves is a prefix of the tree of all ``n``.
    The proof is empty when ``old_size == n`` and when ``old_size == 0`` (see module docstring).

    Raises ``MerkleError`` if ``old_size`` is negative or larger than ``n``.
    """
    n = len(leaf_hashes)
    if old_size < 0:
        raise MerkleError(f"old_size {old_size} is negative")
    if old_size > n:
        raise MerkleError(f"old_size {old_size} is larger than the new tree_size {n}")
    if cache is None:
        _check_leaf_hashes(leaf_hashes)
    if old_size in (0, n):
        return []
    range_root = _range_root if cache is None else cache.root

    # SUBPROOF(m, D[lo:hi], b), unrolled. ``complete`` is the RFC's ``b``: True while the old
    # tree's root is still a node of the subtree being descended (so the verifier has it).
    top_down: list[bytes] = []
    lo, hi = 0, n
    complete = True
    while old_size != hi:
        mid = lo + _split(hi - lo)
        if old_size <= mid:
            top_down.append(range_root(leaf_hashes, mid, hi))
            hi = mid
        else:
            top_down.append(range_root(leaf_hashes, lo, mid))
            lo = mid
            complete = False
    if not complete:
        top_down.append(range_root(leaf_hashes, lo, hi))
    top_down.reverse()
    return top_down


# --------------------------------------------------------------------------------------------
# Verification (never raises on bad input; returns False)
# --------------------------------------------------------------------------------------------


def _all_hash_sized(hashes: Iterable[bytes]) -> bool:
    return all(len(h) == _HASH_SIZE for h in hashes)


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Check an inclusion proof with the RFC 9162 2.1.3.2 algorithm.

    True iff ``proof`` shows that ``leaf_hash`` is leaf number ``index`` of the tree of size
    ``tree_size`` whose root is ``root``. Returns False (never raises) for a bad index or size,
    wrong proof length, wrongly sized hashes or any hash mismatch.

    ``tree_size`` and ``root`` must come from the same signed tree head: the algorithm uses the
    size only to decide the shape of the path, so a proof for size ``n`` can also check out
    against the *same* root under another size that gives the same path shape (e.g. 3 and 4
    for index 0). It can never check out against the genuine root of a different size.
    """
    if not 0 <= index < tree_size:
        return False
    if len(leaf_hash) != _HASH_SIZE or len(root) != _HASH_SIZE or not _all_hash_sized(proof):
        return False

    fn, sn = index, tree_size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            return False  # proof longer than the path
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn != 0 and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Check a consistency proof with the RFC 9162 2.1.4.2 algorithm.

    True iff ``proof`` shows that the tree ``(old_size, old_root)`` is a prefix of the tree
    ``(new_size, new_root)``. Edge cases:

    * ``old_size == new_size``: consistent iff the proof is empty and the roots are equal.
    * ``old_size == 0``: consistent iff the proof is empty and ``old_root == EMPTY_ROOT``
      (and, if ``new_size`` is also 0, ``new_root == EMPTY_ROOT``).

    Returns False (never raises) for negative sizes, ``old_size > new_size``, wrong proof
    length, wrongly sized hashes or any hash mismatch.

    As with ``verify_inclusion``, each size must come from the same signed tree head as its
    root: ``new_size`` only shapes the path, so the same ``new_root`` can also pass under
    another ``new_size`` with the same shape.
    """
    if not 0 <= old_size <= new_size:
        return False
    if len(old_root) != _HASH_SIZE or len(new_root) != _HASH_SIZE:
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT and (new_size > 0 or new_root == EMPTY_ROOT)
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof or not _all_hash_sized(proof):
        return False

    path = list(proof)
    # If old_size is a power of two, the old root is itself a node of the new tree and the
    # proof omits it; the verifier supplies it.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)

    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1

    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False  # proof longer than needed
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn != 0 and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


# --------------------------------------------------------------------------------------------
# Incremental appender
# --------------------------------------------------------------------------------------------


class MerkleFrontier:
    """An append-only Merkle tree that keeps only the O(log n) roots of its perfect subtrees.

    The frontier (a "compact range" over ``[0, size)``) holds one hash per 1-bit of ``size``,
    largest subtree first. ``root()`` equals ``root_from_leaf_hashes`` of every leaf appended so
    far, for every size. It cannot produce proofs (those need the leaves); it is what the
    gateway keeps in memory to compute each new tree head in O(log n).
    """

    __slots__ = ("_size", "_stack")

    def __init__(self) -> None:
        self._size = 0
        self._stack: list[bytes] = []

    @classmethod
    def from_leaf_hashes(cls, leaf_hashes: Iterable[bytes]) -> Self:
        """A frontier with ``leaf_hashes`` appended in order."""
        frontier = cls()
        for h in leaf_hashes:
            frontier.append(h)
        return frontier

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, leaf_hash: bytes) -> int:
        """Append one already-hashed leaf; return its index (the size before appending).

        Raises ``MerkleError`` if ``leaf_hash`` is not a 32-byte hash.
        """
        if len(leaf_hash) != _HASH_SIZE:
            raise MerkleError(
                f"leaf_hash must be a {_HASH_SIZE}-byte hash, got {len(leaf_hash)} bytes"
            )
        index = self._size
        h = leaf_hash
        count = index
        while count & 1:
            h = node_hash(self._stack.pop(), h)
            count >>= 1
        self._stack.append(h)
        self._size = index + 1
        return index

    def root(self) -> bytes:
        """``MTH`` of all leaves appended so far (``EMPTY_ROOT`` when empty)."""
        return _fold(self._stack)

    def __repr__(self) -> str:
        return f"MerkleFrontier(size={self._size}, root={self.root().hex()})"
