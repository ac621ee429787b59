"""The transparency log's cached proofs equal the RFC 9162 reference while the log grows,
and a stored log proves what it holds against its signed tree heads."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.db import open_db, transaction
from gateway.translog import TransparencyLog
from protocol import merkle
from protocol.signing import SigningKey


def leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(hashlib.sha256(str(i).encode()).digest()) for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.data())
def test_cached_proofs_match_the_reference_as_the_log_grows(n, data):
    hashes = leaves(n)
    cache = merkle.SubtreeCache()
    for size in sorted(set(data.draw(st.lists(st.integers(1, n), min_size=1, max_size=6)))):
        prefix = hashes[:size]
        index = data.draw(st.integers(0, size - 1))
        assert merkle.inclusion_proof(index, prefix, cache) == merkle.inclusion_proof(index, prefix)
        old = data.draw(st.integers(0, size))
        assert merkle.consistency_proof(old, prefix, cache) == merkle.consistency_proof(old, prefix)


def test_log_proofs_verify_against_its_tree_heads(tmp_path):
    db = open_db(tmp_path / "custody.db")
    key = SigningKey.generate()
    log = TransparencyLog(db, key)
    heads = []
    for i in range(70):
        with transaction(db) as conn:
            log.append(conn, f"leaf {i}".encode(), i)
        if i % 9 == 0:
            heads.append(log.tree_head(i))
    final = log.tree_head(999)
    for index in (0, 1, 33, 69):
        proof = log.inclusion(index)
        assert merkle.verify_inclusion(
            log.hashes[index], index, final.tree_size, proof, final.root_hash
        )
    for head in heads:
        proof = log.consistency(head.tree_size, final.tree_size)
        assert merkle.verify_consistency(
            head.tree_size, final.tree_size, head.root_hash, final.root_hash, proof
        )
    reopened = TransparencyLog(db, key)  # from the database alone
    assert reopened.root_at(70) == final.root_hash
