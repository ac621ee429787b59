"""Tests for protocol.merkle (RFC 9162 section 2.1 Merkle tree algorithms).

Expected values come from three independent places:

* published RFC 6962 / RFC 9162 test vectors (the Certificate Transparency reference leaves used
  by transparency-dev/merkle and its predecessors), reproduced below as data;
* a naive recursive reference implementation written directly from the RFC definitions (MTH,
  PATH, PROOF/SUBPROOF), with list slicing and no cleverness;
* round trips and tampering under hypothesis.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.merkle import (
    EMPTY_ROOT,
    MerkleError,
    MerkleFrontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# --------------------------------------------------------------------------------------------
# Reference implementation, straight from RFC 9162 2.1.1, 2.1.3.1 and 2.1.4.1
# --------------------------------------------------------------------------------------------


def ref_sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(entries: list[bytes]) -> bytes:
    """MTH(D[n]) over raw entries."""
    n = len(entries)
    if n == 0:
        return ref_sha256(b"")
    if n == 1:
        return ref_sha256(b"\x00" + entries[0])
    k = ref_k(n)
    return ref_sha256(b"\x01" + ref_mth(entries[:k]) + ref_mth(entries[k:]))


def ref_path(m: int, entries: list[bytes]) -> list[bytes]:
    """PATH(m, D[n])."""
    n = len(entries)
    if n == 1:
        return []
    k = ref_k(n)
    if m < k:
        return [*ref_path(m, entries[:k]), ref_mth(entries[k:])]
    return [*ref_path(m - k, entries[k:]), ref_mth(entries[:k])]


def ref_subproof(m: int, entries: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b)."""
    n = len(entries)
    if m == n:
        return [] if b else [ref_mth(entries)]
    k = ref_k(n)
    if m <= k:
        return [*ref_subproof(m, entries[:k], b), ref_mth(entries[k:])]
    return [*ref_subproof(m - k, entries[k:], False), ref_mth(entries[:k])]


def ref_proof(m: int, entries: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) for 0 < m <= n."""
    return ref_subproof(m, entries, True)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def entries_for(n: int, salt: bytes = b"") -> list[bytes]:
    """n distinct log entries (distinct so that a moved leaf is a different tree)."""
    return [salt + b"entry-" + i.to_bytes(4, "big") for i in range(n)]


def hashes_for(n: int, salt: bytes = b"") -> list[bytes]:
    return [leaf_hash(e) for e in entries_for(n, salt)]


def flip(b: bytes, pos: int, bit: int = 0) -> bytes:
    """b with one bit flipped at byte position pos (taken modulo len(b))."""
    ba = bytearray(b)
    ba[pos % len(ba)] ^= 1 << bit
    return bytes(ba)


def h(hex_str: str) -> bytes:
    return bytes.fromhex(hex_str)


# --------------------------------------------------------------------------------------------
# Known answers: hashing primitives and published vectors
# --------------------------------------------------------------------------------------------

CT_ENTRIES = [
    h(x)
    for x in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_LEAVES = [leaf_hash(e) for e in CT_ENTRIES]
# CT_ROOTS[n] is the root of the tree over the first n entries.
CT_ROOTS = [
    h(x)
    for x in (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]
# (index, tree_size, proof), index 0-based.
CT_INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
# (old_size, new_size, proof)
CT_CONSISTENCY = [
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def test_empty_root_is_sha256_of_empty_string() -> None:
    expected = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert EMPTY_ROOT.hex() == expected
    assert root_from_leaf_hashes([]) == EMPTY_ROOT
    assert MerkleFrontier().root() == EMPTY_ROOT
    assert ref_mth([]) == EMPTY_ROOT


def test_leaf_and_node_hash_use_rfc_prefixes() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    left, right = leaf_hash(b"l"), leaf_hash(b"r")
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert node_hash(left, right) != node_hash(right, left)
    # Domain separation: a leaf whose content looks like two child hashes is not a node.
    assert leaf_hash(left + right) != node_hash(left, right)


@pytest.mark.parametrize("n", range(len(CT_ROOTS)))
def test_published_roots(n: int) -> None:
    assert root_from_leaf_hashes(CT_LEAVES[:n]) == CT_ROOTS[n]
    assert MerkleFrontier.from_leaf_hashes(CT_LEAVES[:n]).root() == CT_ROOTS[n]
    assert ref_mth(CT_ENTRIES[:n]) == CT_ROOTS[n]


@pytest.mark.parametrize(("index", "size", "proof_hex"), CT_INCLUSION)
def test_published_inclusion_proofs(index: int, size: int, proof_hex: list[str]) -> None:
    expected = [h(x) for x in proof_hex]
    assert inclusion_proof(index, CT_LEAVES[:size]) == expected
    assert verify_inclusion(CT_LEAVES[index], index, size, expected, CT_ROOTS[size])


@pytest.mark.parametrize(("old", "new", "proof_hex"), CT_CONSISTENCY)
def test_published_consistency_proofs(old: int, new: int, proof_hex: list[str]) -> None:
    expected = [h(x) for x in proof_hex]
    assert consistency_proof(old, CT_LEAVES[:new]) == expected
    assert verify_consistency(old, new, CT_ROOTS[old], CT_ROOTS[new], expected)


def test_matches_reference_implementation_exhaustively_for_small_trees() -> None:
    max_n = 34  # covers every shape up to a bit past 32, including all powers of two
    entries = entries_for(max_n)
    hashes = [leaf_hash(e) for e in entries]
    for n in range(max_n + 1):
        root = root_from_leaf_hashes(hashes[:n])
        assert root == ref_mth(entries[:n]), n
        for i in range(n):
            assert inclusion_proof(i, hashes[:n]) == ref_path(i, entries[:n]), (i, n)
        for m in range(1, n + 1):
            assert consistency_proof(m, hashes[:n]) == ref_proof(m, entries[:n]), (m, n)
        assert consistency_proof(0, hashes[:n]) == []


def test_single_leaf_tree() -> None:
    lh = leaf_hash(b"only")
    assert root_from_leaf_hashes([lh]) == lh
    assert inclusion_proof(0, [lh]) == []
    assert verify_inclusion(lh, 0, 1, [], lh)
    assert not verify_inclusion(lh, 0, 1, [lh], lh)
    assert not verify_inclusion(lh, 1, 1, [], lh)
    assert not verify_inclusion(leaf_hash(b"other"), 0, 1, [], lh)
    assert consistency_proof(1, [lh]) == []
    assert verify_consistency(1, 1, lh, lh, [])


# --------------------------------------------------------------------------------------------
# Inclusion: properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200), salt=st.binary(max_size=4))
def test_every_inclusion_proof_verifies(n: int, salt: bytes) -> None:
    hashes = hashes_for(n, salt)
    root = root_from_leaf_hashes(hashes)
    for i in range(n):
        proof = inclusion_proof(i, hashes)
        assert verify_inclusion(hashes[i], i, n, proof, root), (i, n)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 200))
def test_tampered_inclusion_proofs_fail(data: st.DataObject, n: int) -> None:
    hashes = hashes_for(n)
    root = root_from_leaf_hashes(hashes)
    i = data.draw(st.integers(0, n - 1), label="index")
    proof = inclusion_proof(i, hashes)
    leaf = hashes[i]
    assert verify_inclusion(leaf, i, n, proof, root)

    pos = data.draw(st.integers(0, 31), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")

    # A flipped bit anywhere: every proof element, the leaf, the root.
    for k in range(len(proof)):
        bad = list(proof)
        bad[k] = flip(bad[k], pos, bit)
        assert not verify_inclusion(leaf, i, n, bad, root), k
    assert not verify_inclusion(flip(leaf, pos, bit), i, n, proof, root)
    assert not verify_inclusion(leaf, i, n, proof, flip(root, pos, bit))

    # Another leaf of the same tree, or the right leaf at the wrong index.
    j = data.draw(st.integers(0, n - 1).filter(lambda x: x != i) if n > 1 else st.just(i))
    if j != i:
        assert not verify_inclusion(hashes[j], i, n, proof, root)
        assert not verify_inclusion(leaf, j, n, proof, root)

    # Another tree size, checked against that size's genuine root.
    n2 = data.draw(st.integers(i + 1, 210).filter(lambda x: x != n), label="other size")
    root2 = root_from_leaf_hashes(hashes_for(n2))
    assert not verify_inclusion(leaf, i, n2, proof, root2)

    # Wrong length: truncated, extended, padded in front.
    if proof:
        assert not verify_inclusion(leaf, i, n, proof[:-1], root)
        assert not verify_inclusion(leaf, i, n, proof[1:], root)
    assert not verify_inclusion(leaf, i, n, [*proof, root], root)
    assert not verify_inclusion(leaf, i, n, [root, *proof], root)
    if len(proof) > 1 and proof[0] != proof[1]:
        swapped = [proof[1], proof[0], *proof[2:]]
        assert not verify_inclusion(leaf, i, n, swapped, root)


def test_verify_inclusion_rejects_bad_arguments_without_raising() -> None:
    hashes = hashes_for(8)
    root = root_from_leaf_hashes(hashes)
    proof = inclusion_proof(5, hashes)
    leaf = hashes[5]
    assert verify_inclusion(leaf, 5, 8, proof, root)
    assert not verify_inclusion(leaf, -1, 8, proof, root)
    assert not verify_inclusion(leaf, 8, 8, proof, root)
    assert not verify_inclusion(leaf, 0, 0, [], EMPTY_ROOT)
    assert not verify_inclusion(leaf, 0, -3, proof, root)
    assert not verify_inclusion(leaf[:31], 5, 8, proof, root)
    assert not verify_inclusion(leaf + b"\x00", 5, 8, proof, root)
    assert not verify_inclusion(leaf, 5, 8, proof, root[:31])
    assert not verify_inclusion(leaf, 5, 8, [proof[0][:31], *proof[1:]], root)
    assert not verify_inclusion(leaf, 5, 8, [b"", *proof], root)
    assert not verify_inclusion(leaf, 5, 8, [], root)
    assert not verify_inclusion(leaf, 5, 2**70, proof, root)


# --------------------------------------------------------------------------------------------
# Consistency: properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200), salt=st.binary(max_size=4))
def test_every_consistency_proof_verifies(n: int, salt: bytes) -> None:
    frontier = MerkleFrontier()
    hashes = hashes_for(n, salt)
    old_roots = [EMPTY_ROOT]
    for lh in hashes:
        frontier.append(lh)
        old_roots.append(frontier.root())
    new_root = old_roots[n]
    for m in range(n + 1):
        proof = consistency_proof(m, hashes)
        assert verify_consistency(m, n, old_roots[m], new_root, proof), (m, n)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(2, 200))
def test_tampered_consistency_proofs_fail(data: st.DataObject, n: int) -> None:
    hashes = hashes_for(n)
    m = data.draw(st.integers(1, n - 1), label="old_size")
    old_root = root_from_leaf_hashes(hashes[:m])
    new_root = root_from_leaf_hashes(hashes)
    proof = consistency_proof(m, hashes)
    assert proof
    assert verify_consistency(m, n, old_root, new_root, proof)

    pos = data.draw(st.integers(0, 31), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")

    for k in range(len(proof)):
        bad = list(proof)
        bad[k] = flip(bad[k], pos, bit)
        assert not verify_consistency(m, n, old_root, new_root, bad), k
    assert not verify_consistency(m, n, flip(old_root, pos, bit), new_root, proof)
    assert not verify_consistency(m, n, old_root, flip(new_root, pos, bit), proof)
    assert not verify_consistency(m, n, new_root, old_root, proof)

    # Wrong length.
    assert not verify_consistency(m, n, old_root, new_root, [])
    assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
    assert not verify_consistency(m, n, old_root, new_root, [*proof, new_root])
    assert not verify_consistency(m, n, old_root, new_root, [proof[0], *proof])
    assert not verify_consistency(m, n, old_root, new_root, [old_root, *proof])

    # Wrong old size, with the same roots or with that size's genuine root.
    m2 = data.draw(st.integers(1, n - 1).filter(lambda x: x != m) if n > 2 else st.just(m))
    if m2 != m:
        assert not verify_consistency(m2, n, old_root, new_root, proof)
        assert not verify_consistency(m2, n, root_from_leaf_hashes(hashes[:m2]), new_root, proof)

    # Wrong new size, checked against that size's genuine root.
    n2 = data.draw(st.integers(m + 1, 210).filter(lambda x: x != n), label="other new size")
    assert not verify_consistency(m, n2, old_root, root_from_leaf_hashes(hashes_for(n2)), proof)

    # Rewriting history: alter one leaf the old tree head already covered. The log's new root
    # changes, and neither the honest proof nor one generated from the rewritten log links the
    # old tree head to it.
    j = data.draw(st.integers(0, m - 1), label="rewritten leaf")
    rewritten = list(hashes)
    rewritten[j] = leaf_hash(b"rewritten")
    rewritten_root = root_from_leaf_hashes(rewritten)
    assert rewritten_root != new_root
    assert not verify_consistency(m, n, old_root, rewritten_root, proof)
    assert not verify_consistency(m, n, old_root, rewritten_root, consistency_proof(m, rewritten))

    # Dropping a covered leaf (the log shrinks then regrows to n) is caught the same way.
    dropped = [*hashes[:j], *hashes[j + 1 :], leaf_hash(b"filler")]
    dropped_root = root_from_leaf_hashes(dropped)
    assert not verify_consistency(m, n, old_root, dropped_root, consistency_proof(m, dropped))

    # Control: changing a leaf *after* old_size is a legitimate different append history, so
    # the proof from that log is still consistent with the old tree head.
    j2 = data.draw(st.integers(m, n - 1), label="appended leaf")
    appended = list(hashes)
    appended[j2] = leaf_hash(b"different append")
    appended_root = root_from_leaf_hashes(appended)
    assert verify_consistency(m, n, old_root, appended_root, consistency_proof(m, appended))


def test_consistency_edge_cases() -> None:
    hashes = hashes_for(8)
    roots = [root_from_leaf_hashes(hashes[:n]) for n in range(9)]
    some = leaf_hash(b"some")

    # old_size == new_size: empty proof, and the roots must be equal.
    for n in range(9):
        assert consistency_proof(n, hashes[:n]) == []
        assert verify_consistency(n, n, roots[n], roots[n], [])
    assert not verify_consistency(4, 4, roots[4], roots[5], [])
    assert not verify_consistency(4, 4, roots[4], roots[4], [roots[4]])

    # old_size == 0: consistent with anything, but only with an empty proof and the genuine
    # empty-tree root.
    for n in range(9):
        assert verify_consistency(0, n, EMPTY_ROOT, roots[n], [])
        assert not verify_consistency(0, n, EMPTY_ROOT, roots[n], [EMPTY_ROOT])
        assert not verify_consistency(0, n, some, roots[n], [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, some, [])

    # Going backwards, negative sizes, wrongly sized hashes: False, never an exception.
    proof = consistency_proof(6, hashes)
    assert verify_consistency(6, 8, roots[6], roots[8], proof)
    assert not verify_consistency(8, 6, roots[8], roots[6], proof)
    assert not verify_consistency(-1, 8, roots[6], roots[8], proof)
    assert not verify_consistency(6, -8, roots[6], roots[8], proof)
    assert not verify_consistency(6, 8, roots[6][:31], roots[8], proof)
    assert not verify_consistency(6, 8, roots[6], roots[8] + b"\x00", proof)
    assert not verify_consistency(6, 8, roots[6], roots[8], [proof[0][:31], *proof[1:]])
    assert not verify_consistency(6, 8, roots[6], roots[8], [b"", *proof])
    assert not verify_consistency(6, 2**70, roots[6], roots[8], proof)
    assert not verify_consistency(1, 1, b"", b"", [])


# --------------------------------------------------------------------------------------------
# Frontier
# --------------------------------------------------------------------------------------------


def test_frontier_root_equals_batch_root_for_every_size() -> None:
    hashes = hashes_for(300)
    frontier = MerkleFrontier()
    assert frontier.size == 0
    for n, lh in enumerate(hashes):
        assert frontier.append(lh) == n
        assert frontier.size == n + 1
        assert frontier.root() == root_from_leaf_hashes(hashes[: n + 1]), n + 1
        # Only one hash per 1-bit of the size is kept.
        assert len(frontier._stack) == (n + 1).bit_count()


@settings(max_examples=40, deadline=None)
@given(leaves=st.lists(st.binary(max_size=16), max_size=70))
def test_frontier_matches_reference_on_arbitrary_entries(leaves: list[bytes]) -> None:
    hashes = [leaf_hash(e) for e in leaves]
    frontier = MerkleFrontier.from_leaf_hashes(hashes)
    assert frontier.size == len(leaves)
    assert frontier.root() == root_from_leaf_hashes(hashes) == ref_mth(leaves)


def test_frontier_from_iterable_and_repr() -> None:
    frontier = MerkleFrontier.from_leaf_hashes(iter(CT_LEAVES))
    assert frontier.size == 8
    assert frontier.root() == CT_ROOTS[8]
    assert "size=8" in repr(frontier)
    assert CT_ROOTS[8].hex() in repr(frontier)


def test_frontier_rejects_wrongly_sized_leaf_hash() -> None:
    frontier = MerkleFrontier.from_leaf_hashes(CT_LEAVES[:3])
    with pytest.raises(MerkleError, match="32-byte.*got 5 bytes"):
        frontier.append(b"short")
    # A rejected append leaves the frontier unchanged.
    assert frontier.size == 3
    assert frontier.root() == CT_ROOTS[3]


# --------------------------------------------------------------------------------------------
# Generator argument errors
# --------------------------------------------------------------------------------------------


def test_merkle_error_is_a_value_error() -> None:
    assert issubclass(MerkleError, ValueError)


@pytest.mark.parametrize(
    ("index", "size", "pattern"),
    [
        (-1, 8, r"index -1 out of range for tree_size 8"),
        (8, 8, r"index 8 out of range for tree_size 8"),
        (100, 3, r"index 100 out of range for tree_size 3"),
        (0, 0, r"index 0 out of range: the tree is empty"),
    ],
)
def test_inclusion_proof_bad_index(index: int, size: int, pattern: str) -> None:
    with pytest.raises(MerkleError, match=pattern):
        inclusion_proof(index, hashes_for(size))


@pytest.mark.parametrize(
    ("old_size", "size", "pattern"),
    [
        (-1, 8, r"old_size -1 is negative"),
        (9, 8, r"old_size 9 is larger than the new tree_size 8"),
        (1, 0, r"old_size 1 is larger than the new tree_size 0"),
    ],
)
def test_consistency_proof_bad_old_size(old_size: int, size: int, pattern: str) -> None:
    with pytest.raises(MerkleError, match=pattern):
        consistency_proof(old_size, hashes_for(size))


def test_generators_reject_wrongly_sized_leaf_hashes() -> None:
    hashes = hashes_for(5)
    hashes[3] = hashes[3][:20]
    with pytest.raises(MerkleError, match=r"leaf_hashes\[3\] must be a 32-byte hash, got 20"):
        root_from_leaf_hashes(hashes)
    with pytest.raises(MerkleError, match=r"leaf_hashes\[3\]"):
        inclusion_proof(0, hashes)
    with pytest.raises(MerkleError, match=r"leaf_hashes\[3\]"):
        consistency_proof(2, hashes)


# --------------------------------------------------------------------------------------------
# Scale
# --------------------------------------------------------------------------------------------


def test_large_tree() -> None:
    # Every operation is O(n) hashes (no quadratic slicing), so 100k leaves take well under a
    # second per pass; a quadratic implementation would hit the suite's timeout instead.
    n = 100_003
    hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    root = root_from_leaf_hashes(hashes)
    assert MerkleFrontier.from_leaf_hashes(hashes).root() == root
    for i in (0, 65_535, 65_536, n - 1):
        assert verify_inclusion(hashes[i], i, n, inclusion_proof(i, hashes), root)
    old = 77_777
    old_root = root_from_leaf_hashes(hashes[:old])
    assert verify_consistency(old, n, old_root, root, consistency_proof(old, hashes))
