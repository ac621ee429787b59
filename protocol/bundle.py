"""Case bundles: what a supervisor checks without trusting the gateway that made them.

A bundle is a zip (written by ``gateway.export``) whose members are::

    manifest.json            every other member's sha256 and size, the evidence items, the
                             journal range of each device, the tree size; signed by
    manifest.sig             the gateway (Ed25519, hex, over the canonical manifest)
    gateway.pub              the gateway's public key (hex); pin your own copy instead
    tree_head.json           one signed tree head of the transparency log, made at export
    journal/<device>.jsonl   the device's signed records, contiguous from the first to the
                             last exported seq (contiguity shows nothing was removed)
    keys/<device>.json       which device key signs which seq range (key rotation)
    proofs/<device>.jsonl    per journal record and per evidence item: log index, leaf,
                             RFC 9162 inclusion proof against tree_head.json
    media/<device>/<seq>-<sha256 prefix>.<ext>   the evidence bytes
    certs/…  case.json  coverage.json  coverage.html   context, covered by the manifest

``verify_bundle`` trusts nothing in the bundle that it can recompute: leaves are rebuilt
from the records and the media's signed manifests, media hashes from the bytes, key
hand-overs from the signed ``key_rotation`` records. The gateway's signature binds the
rest (case, coverage, key history) so that none of it can be edited unnoticed.

What a bundle cannot show by itself: that each device's *first* key in the range is
really the device's (that is the gateway's word from enrollment; later keys must be
handed over by signed records), and that the tree head is consistent with one the reader
already holds (a device receipt, an earlier export): for that, ask the gateway for a
consistency proof (``/api/v1/log/consistency``).

Pure: no I/O. Members are read through a ``BundleReader`` that the caller provides (a
plain ``Mapping[str, bytes]`` works too), so media is hashed in blocks, never held whole.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol import merkle
from protocol.encoding import canonical, decode, from_hex
from protocol.errors import MessageError, ProtocolError, SignatureError
from protocol.fields import check_fields, int_field
from protocol.journal import SignedRecord, check_device_id
from protocol.receipt import SignedTreeHead, evidence_leaf, record_leaf
from protocol.signing import VerifyKey, verify_object

BUNDLE_VERSION = 1
BUNDLE_KIND = "custody-case-bundle"
MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"
GATEWAY_PUB = "gateway.pub"
TREE_HEAD = "tree_head.json"
CASE = "case.json"
COVERAGE = "coverage.json"
COVERAGE_HTML = "coverage.html"
SHA_PREFIX = 12  # hex characters of the sha256 in a media file name


def journal_name(device_id: str) -> str:
    return f"journal/{device_id}.jsonl"


def keys_name(device_id: str) -> str:
    return f"keys/{device_id}.json"


def proofs_name(device_id: str) -> str:
    return f"proofs/{device_id}.jsonl"


def media_name(device_id: str, seq: int, sha256_hex: str, ext: str) -> str:
    return f"media/{device_id}/{seq}-{sha256_hex[:SHA_PREFIX]}.{ext}"


PROOF_FIELDS = ("leaf_type", "device_id", "seq", "log_index", "leaf", "inclusion_proof")


def proof_entry(
    leaf_type: str, device_id: str, seq: int, log_index: int, leaf: bytes, path: list[bytes]
) -> dict[str, Any]:
    """One line of ``proofs/<device>.jsonl``. ``leaf`` is kept as the exact logged text,
    so any RFC 9162 tool can hash it; our verifier rebuilds it instead of trusting it."""
    return {
        "leaf_type": leaf_type,
        "device_id": device_id,
        "seq": seq,
        "log_index": log_index,
        "leaf": leaf.decode(),
        "inclusion_proof": [h.hex() for h in path],
    }


class MemberUnreadable(ProtocolError):
    """A reader could not produce a member's bytes (a damaged zip entry)."""

    reason = "unreadable_member"


class BundleReader(Protocol):
    def names(self) -> list[str]:
        """Every member name, in archive order, duplicates included."""
        ...

    def blocks(self, name: str) -> Iterator[bytes]:
        """The member's bytes in blocks; raises ``MemberUnreadable`` if it cannot."""
        ...


@dataclass(frozen=True)
class _MappingReader:
    files: Mapping[str, bytes]

    def names(self) -> list[str]:
        return list(self.files)

    def blocks(self, name: str) -> Iterator[bytes]:
        yield self.files[name]


@dataclass(frozen=True)
class Problem:
    """One thing that does not check out: which member (and device, seq) and why."""

    item: str
    reason: str
    device_id: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


@dataclass
class Verdict:
    problems: list[Problem]
    checked: dict[str, int]
    key_hex: str  # the gateway key the signatures were checked with ("" if none)
    key_source: str  # "pinned" or "bundle" (the bundle's own gateway.pub)
    tree_size: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def headline(self) -> str:
        if self.problems:
            n = len(self.problems)
            return f"FAILED: {n} problem{'s' if n != 1 else ''}"
        source = "pinned key" if self.key_source == "pinned" else "key from the bundle, not pinned"
        c = self.checked
        return (
            f"VERIFIED: {c['media']} media, {c['journal_records']} journal records, "
            f"{c['proofs']} proofs against tree head of size {self.tree_size} "
            f"signed by {self.key_hex[:16]}… ({source})"
        )


def verify_bundle(
    files: Mapping[str, bytes] | BundleReader, gateway_key: VerifyKey | None = None
) -> Verdict:
    """Check everything in a bundle; never raises on bad input (it becomes a ``Problem``).

    With ``gateway_key`` the signatures must be by that (pinned) key; without it the
    bundle's own ``gateway.pub`` is used, which proves integrity but not origin.
    """
    reader = _MappingReader(files) if isinstance(files, Mapping) else files
    return _Check(reader, gateway_key).run()


def _differ(a: bytes, b: bytes) -> tuple[str, str]:
    """Hex prefixes of two hashes long enough that a reader sees them differ."""
    x, y = a.hex(), b.hex()
    n = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
    return f"{x[: max(16, n + 4)]}…", f"{y[: max(16, n + 4)]}…"


def _seqs(first: int, last: int) -> str:
    return f"seq {first} is" if first == last else f"seqs {first}..{last} are"


@dataclass
class _Check:
    reader: BundleReader
    pinned: VerifyKey | None
    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("members", "media", "journal_records", "proofs"), 0)
    )
    digests: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> sha256, size
    small: dict[str, bytes] = field(default_factory=dict)  # every member but media, read whole
    listed: set[str] = field(default_factory=set)  # members the manifest names
    unreadable: set[str] = field(default_factory=set)  # reported once, when read
    records: dict[tuple[str, int], SignedRecord] = field(default_factory=dict)

    def bad(
        self, item: str, reason: str, device: str | None = None, seq: int | None = None
    ) -> None:
        self.problems.append(Problem(item, reason, device, seq))

    def run(self) -> Verdict:
        self._read_members()
        key, source = self._gateway_key()
        who = f"{key.hex[:16]}… ({source})" if key else "(none: no gateway.pub, none pinned)"
        manifest = self._manifest(key, who)
        head = self._tree_head(key, who, manifest)
        verdict = Verdict(self.problems, self.checked, key.hex if key else "", source, 0)
        if manifest is None or head is None:
            return verdict
        verdict.tree_size = head.tree_size
        ranges = self._ranges(manifest)
        evidence = self._evidence_items(manifest, ranges)
        for device_id, (first, last) in ranges.items():
            if self._journal(device_id, first, last, self._key_history(device_id)):
                seqs = [seq for d, seq, _ in evidence if d == device_id]
                self._proofs(device_id, seqs, head)
        self._media(evidence)
        return verdict

    # -- members and signatures ----------------------------------------------------------

    def _read_members(self) -> None:
        names = self.reader.names()
        for name, count in Counter(names).items():
            if count > 1:
                self.bad(name, f"appears {count} times in the zip: one copy can hide another")
        for name in dict.fromkeys(names):
            digest, size, parts = hashlib.sha256(), 0, []
            try:
                for block in self.reader.blocks(name):
                    digest.update(block)
                    size += len(block)
                    if not name.startswith("media/"):
                        parts.append(block)
            except MemberUnreadable as exc:
                self.bad(name, f"cannot be read: {exc}")
                self.unreadable.add(name)
                continue
            self.digests[name] = (digest.hexdigest(), size)
            if not name.startswith("media/"):
                self.small[name] = b"".join(parts)

    def _json(self, name: str) -> dict[str, Any] | None:
        if name not in self.small:
            if name not in self.digests and name not in self.listed | self.unreadable:
                self.bad(name, "is missing from the bundle")
            return None
        try:
            return decode(self.small[name], what=name)
        except ProtocolError as exc:
            self.bad(name, str(exc))
            return None

    def _gateway_key(self) -> tuple[VerifyKey | None, str]:
        bundled = None
        if GATEWAY_PUB in self.small:
            try:
                bundled = VerifyKey.from_hex(self.small[GATEWAY_PUB].decode().strip())
            except (ProtocolError, UnicodeDecodeError) as exc:
                self.bad(GATEWAY_PUB, f"is not a hex Ed25519 public key: {exc}")
        if self.pinned is None:
            return bundled, "bundle"
        if bundled is not None and bundled != self.pinned:
            self.bad(
                GATEWAY_PUB,
                f"the bundle names gateway key {bundled.hex[:16]}… but the pinned key is "
                f"{self.pinned.hex[:16]}…",
            )
        return self.pinned, "pinned"

    def _manifest(self, key: VerifyKey | None, who: str) -> dict[str, Any] | None:
        manifest = self._json(MANIFEST)
        if manifest is None:
            return None
        try:
            sig = from_hex(self.small.get(MANIFEST_SIG, b"").decode().strip(), field=MANIFEST_SIG)
            if key is None:
                raise SignatureError("there is no key to check it with")
            key.verify(sig, canonical(manifest))
        except (ProtocolError, UnicodeDecodeError) as exc:
            self.bad(MANIFEST_SIG, f"not signed by the gateway key {who}: {exc}")
        try:
            if manifest.get("v") != BUNDLE_VERSION or manifest.get("bundle") != BUNDLE_KIND:
                raise MessageError(f"is not a version {BUNDLE_VERSION} {BUNDLE_KIND}")
            files = manifest.get("files")
            if not isinstance(files, dict):
                raise MessageError("files must be an object of name -> sha256, size")
            self.listed = set(files)
            for name, entry in files.items():
                self._member(name, entry)
        except ProtocolError as exc:
            self.bad(MANIFEST, str(exc))
            return None
        for name in self.digests.keys() - self.listed - {MANIFEST, MANIFEST_SIG}:
            self.bad(name, "is in the bundle but not in the signed manifest")
        return manifest

    def _member(self, name: str, entry: object) -> None:
        if not isinstance(entry, dict):
            raise MessageError(f"files[{name!r}] must be an object")
        check_fields(entry, f"files[{name!r}]", {"sha256", "size"})
        want = from_hex(entry["sha256"], field="sha256", length=32)
        if name not in self.digests:
            if name not in self.unreadable:
                self.bad(name, "is listed in the manifest but missing from the bundle")
            return
        sha, size = self.digests[name]
        if sha != want.hex():
            got, said = _differ(bytes.fromhex(sha), want)
            self.bad(name, f"sha256 is {got} but the manifest says {said}")
        elif size != entry["size"]:
            self.bad(name, f"size is {size} but the manifest says {entry['size']}")
        else:
            self.checked["members"] += 1

    def _tree_head(
        self, key: VerifyKey | None, who: str, manifest: dict[str, Any] | None
    ) -> SignedTreeHead | None:
        obj = self._json(TREE_HEAD)
        if obj is None:
            return None
        try:
            check_fields(obj, "tree head", {"v", "tree_size", "root_hash", "timestamp_ms", "sig"})
            head = SignedTreeHead(
                int_field(obj, "tree_size"),
                from_hex(obj["root_hash"], field="root_hash", length=32),
                int_field(obj, "timestamp_ms"),
                from_hex(obj["sig"], field="sig", length=64),
            )
        except ProtocolError as exc:
            self.bad(TREE_HEAD, str(exc))
            return None
        try:
            if key is None:
                raise SignatureError("there is no key to check it with")
            verify_object(obj, key, what="tree head")
        except ProtocolError as exc:
            self.bad(TREE_HEAD, f"signature invalid: not signed by the gateway key {who}: {exc}")
        if manifest is not None and manifest.get("tree_size") != head.tree_size:
            said = manifest.get("tree_size")
            self.bad(TREE_HEAD, f"tree size {head.tree_size} but the manifest says {said!r}")
        return head

    # -- what the manifest says is in the bundle -------------------------------------------

    def _ranges(self, manifest: dict[str, Any]) -> dict[str, tuple[int, int]]:
        ranges: dict[str, tuple[int, int]] = {}
        journal = manifest.get("journal")
        if not isinstance(journal, dict):
            self.bad(MANIFEST, "journal must be an object of device -> first_seq, last_seq")
            return ranges
        for device_id, span in journal.items():
            try:
                check_device_id(device_id)
                if not isinstance(span, dict):
                    raise MessageError("must be an object")
                check_fields(span, "range", {"first_seq", "last_seq"})
                first = int_field(span, "first_seq", 1)
                ranges[device_id] = (first, int_field(span, "last_seq", first))
            except ProtocolError as exc:
                self.bad(MANIFEST, f"journal range of {device_id!r}: {exc}")
        expected = {f(d) for d in ranges for f in (journal_name, keys_name, proofs_name)}
        for name in self.digests:
            if name.startswith(("journal/", "keys/", "proofs/")) and name not in expected:
                self.bad(name, "belongs to no device of the manifest's journal ranges")
        return ranges

    def _evidence_items(
        self, manifest: dict[str, Any], ranges: dict[str, tuple[int, int]]
    ) -> list[tuple[str, int, str]]:
        items: list[tuple[str, int, str]] = []
        listed = manifest.get("evidence")
        if not isinstance(listed, list):
            self.bad(MANIFEST, "evidence must be a list of {device_id, seq, media}")
            return items
        for i, entry in enumerate(listed):
            try:
                if not isinstance(entry, dict):
                    raise MessageError("must be an object")
                check_fields(entry, "item", {"device_id", "seq", "media"})
                device_id, seq = check_device_id(entry["device_id"]), int_field(entry, "seq", 1)
                name = entry["media"]
                if not isinstance(name, str) or not name.startswith(f"media/{device_id}/"):
                    raise MessageError(f"media must be a file under media/{device_id}/")
            except ProtocolError as exc:
                self.bad(MANIFEST, f"evidence[{i}]: {exc}")
                continue
            first, last = ranges.get(device_id, (0, -1))
            if not first <= seq <= last:
                reason = f"evidence {device_id} seq {seq} lies outside its journal range"
                self.bad(MANIFEST, reason, device_id, seq)
            items.append((device_id, seq, name))
        return items

    def _key_history(self, device_id: str) -> list[tuple[int, VerifyKey]]:
        name, keys = keys_name(device_id), []
        obj = self._json(name)
        try:
            if obj is not None and (
                obj.get("device_id") != device_id or not isinstance(obj.get("keys"), list)
            ):
                raise MessageError(f"must name device {device_id} and list its keys")
            for entry in obj["keys"] if obj is not None else []:
                if not isinstance(entry, dict):
                    raise MessageError("each key must be an object")
                check_fields(entry, "key", {"from_seq", "public_key"}, {"to_seq", "at_ms"})
                key = VerifyKey.from_hex(entry["public_key"])
                keys.append((int_field(entry, "from_seq", 1), key))
        except ProtocolError as exc:
            self.bad(name, str(exc), device_id)
        return sorted(keys, key=lambda k: k[0])

    # -- the journal: signatures, chain, contiguity --------------------------------------

    def _journal(
        self, device_id: str, first: int, last: int, keys: list[tuple[int, VerifyKey]]
    ) -> bool:
        """Check one device's records; False when there are none to check at all."""
        name = journal_name(device_id)
        if name not in self.small:
            self._json(name)  # says it is missing, unless the manifest check already did
            return False
        expected, prev = first, None
        for lineno, line in enumerate(self.small[name].split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                signed = SignedRecord.from_wire(decode(line, what="record"))
                if signed.record.device_id != device_id:
                    raise MessageError(f"is a record of {signed.record.device_id}")
            except ProtocolError as exc:
                reason = f"line {lineno} (after seq {expected - 1}) is not a valid record: {exc}"
                self.bad(name, reason, device_id)
                continue
            rec = signed.record
            if rec.seq < expected or rec.seq > last:
                reason = (
                    f"seq {rec.seq} appears again after seq {expected - 1} (fork or copy)"
                    if rec.seq < expected
                    else f"seq {rec.seq} lies beyond the manifest's range (up to seq {last})"
                )
                self.bad(name, reason, device_id, rec.seq)
                continue
            if rec.seq > expected:
                where = (
                    f"between {expected - 1} and {rec.seq}"
                    if expected > first
                    else f"at the start of the range (its first record is seq {rec.seq})"
                )
                self.bad(
                    name, f"{_seqs(expected, rec.seq - 1)} missing {where}", device_id, expected
                )
            linked = rec.seq == expected and (prev is None or rec.prev == prev.hash())
            if rec.seq == expected and not linked and prev is not None:
                said, is_ = _differ(rec.prev, prev.hash())
                reason = (
                    f"seq {rec.seq} does not link to seq {prev.record.seq}: its prev is {said} "
                    f"but seq {prev.record.seq} hashes to {is_} (altered or forked)"
                )
                self.bad(name, reason, device_id, rec.seq)
            if self._signature(name, signed, keys) and linked:
                self.checked["journal_records"] += 1
            self.records[(device_id, rec.seq)] = signed
            expected, prev = rec.seq + 1, signed
        if expected <= last:
            reason = f"{_seqs(expected, last)} missing at the end of the range (up to seq {last})"
            self.bad(name, reason, device_id, expected)
        self._hand_overs(device_id, first, last, keys)
        return True

    def _signature(
        self, name: str, signed: SignedRecord, keys: list[tuple[int, VerifyKey]]
    ) -> bool:
        rec = signed.record
        usable = [(f, k) for f, k in keys if f <= rec.seq]
        if not usable:
            reason = f"no device key for seq {rec.seq}"
            self.bad(keys_name(rec.device_id), reason, rec.device_id, rec.seq)
            return False
        from_seq, key = usable[-1]
        try:
            signed.verify(key)
        except SignatureError:
            reason = (
                f"seq {rec.seq}: device signature does not verify with key {key.hex[:16]}… "
                f"(valid from seq {from_seq})"
            )
            self.bad(name, reason, rec.device_id, rec.seq)
            return False
        return True

    def _hand_overs(
        self, device_id: str, first: int, last: int, keys: list[tuple[int, VerifyKey]]
    ) -> None:
        """Every key change inside the range must be a signed ``key_rotation`` record of
        the key before it, naming the new key; else the history could smuggle a key in."""
        history, name = dict(keys), keys_name(device_id)
        for seq in range(first, last):
            signed = self.records.get((device_id, seq))
            if signed is None:
                continue  # the gap is reported already
            if signed.record.kind != "key_rotation":
                if seq + 1 in history:
                    reason = f"a new key from seq {seq + 1}, but seq {seq} is no key_rotation"
                    self.bad(name, reason, device_id, seq + 1)
                continue
            named = str(signed.record.body.get("new_public_key"))
            if seq + 1 not in history or history[seq + 1].hex != named:
                reason = (
                    f"seq {seq} hands the journal over to key {named[:16]}… but the key "
                    f"history has no such key from seq {seq + 1}"
                )
                self.bad(name, reason, device_id, seq)

    # -- inclusion in the signed log -----------------------------------------------------

    def _proofs(self, device_id: str, evidence_seqs: list[int], head: SignedTreeHead) -> None:
        name = proofs_name(device_id)
        entries: dict[tuple[str, int], dict[str, Any]] = {}
        for lineno, line in enumerate(self.small.get(name, b"").split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                obj = decode(line, what="proof")
                check_fields(obj, "proof", {*PROOF_FIELDS})
                if obj["leaf_type"] not in ("record", "evidence") or obj["device_id"] != device_id:
                    raise MessageError(f"is not a record or evidence proof of {device_id}")
                key = (str(obj["leaf_type"]), int_field(obj, "seq", 1))
            except ProtocolError as exc:
                self.bad(name, f"line {lineno} is not a valid proof: {exc}", device_id)
                continue
            if key in entries:
                self.bad(name, f"two proofs for {key[0]} seq {key[1]}", device_id, key[1])
            entries[key] = obj
        for (dev, seq), signed in self.records.items():
            if dev == device_id:
                leaf = record_leaf(signed)
                self._inclusion(name, device_id, ("record", seq), leaf, entries, head)
        for seq in evidence_seqs:
            found = self.records.get((device_id, seq))
            media = found.record.media if found is not None else None
            if media is None:
                # Nothing signed to rebuild the leaf from; reported with the media file.
                entries.pop(("evidence", seq), None)
                continue
            received = self._received_at(name, device_id, seq, entries)
            if received is not None:
                leaf = evidence_leaf(device_id, seq, media.sha256, media.size, received)
                self._inclusion(name, device_id, ("evidence", seq), leaf, entries, head)
        for leaf_type, seq in entries:
            reason = f"a proof for {leaf_type} seq {seq}, which is not in the bundle"
            self.bad(name, reason, device_id, seq)

    def _received_at(
        self, name: str, device_id: str, seq: int, entries: dict[tuple[str, int], dict[str, Any]]
    ) -> int | None:
        """The one evidence leaf field that no signed record holds, so it is taken from the
        logged leaf: if it were altered, the inclusion proof would fail."""
        entry = entries.get(("evidence", seq))
        if entry is None:
            return 0  # ``_inclusion`` reports the missing proof
        try:
            logged = decode(str(entry["leaf"]).encode(), what="evidence leaf")
            return int_field(logged, "received_at_ms")
        except ProtocolError as exc:
            self.bad(name, f"evidence seq {seq}: malformed leaf: {exc}", device_id, seq)
            entries.pop(("evidence", seq))
            return None

    def _inclusion(
        self,
        name: str,
        device_id: str,
        key: tuple[str, int],
        leaf: bytes,
        entries: dict[tuple[str, int], dict[str, Any]],
        head: SignedTreeHead,
    ) -> None:
        """Check ``leaf`` (rebuilt from signed data, never taken from the file) against the
        signed root; consumes its entry so that leftovers can be reported."""
        what, seq = f"{key[0]} seq {key[1]}", key[1]
        entry = entries.pop(key, None)
        if entry is None:
            self.bad(name, f"no inclusion proof for {what}", device_id, seq)
            return
        try:
            index, path = int_field(entry, "log_index"), entry["inclusion_proof"]
            if not isinstance(path, list):
                raise MessageError("inclusion_proof must be a list of hashes")
            hashes = [from_hex(h, field="inclusion_proof[]", length=32) for h in path]
        except ProtocolError as exc:
            self.bad(name, f"{what}: malformed proof: {exc}", device_id, seq)
            return
        if entry["leaf"] != leaf.decode():
            reason = f"{what}: the leaf given differs from the one rebuilt from the signed data"
            self.bad(name, reason, device_id, seq)
        if merkle.verify_inclusion(
            merkle.leaf_hash(leaf), index, head.tree_size, hashes, head.root_hash
        ):
            self.checked["proofs"] += 1
        else:
            reason = (
                f"{what} (log index {index}): inclusion proof does not lead to the signed root "
                f"of the tree head of size {head.tree_size}"
            )
            self.bad(name, reason, device_id, seq)

    # -- the media bytes against their signed manifests ----------------------------------

    def _media(self, evidence: list[tuple[str, int, str]]) -> None:
        for device_id, seq, name in evidence:
            signed = self.records.get((device_id, seq))
            info = signed.record.media if signed is not None else None
            if signed is None or info is None:
                what = "no signed record" if signed is None else f"a {signed.record.kind} record"
                reason = (
                    f"{device_id} seq {seq} has {what} in {journal_name(device_id)}, so nothing "
                    "vouches for these bytes"
                )
                self.bad(name, reason, device_id, seq)
            elif name not in self.digests:
                if name not in self.listed:
                    self.bad(name, f"the media of {device_id} seq {seq} is missing", device_id, seq)
            elif self.digests[name][0] != info.sha256.hex():
                got, said = _differ(bytes.fromhex(self.digests[name][0]), info.sha256)
                reason = f"sha256 is {got} but the signed manifest record seq {seq} says {said}"
                self.bad(name, reason, device_id, seq)
            elif self.digests[name][1] != info.size:
                size = self.digests[name][1]
                reason = f"size is {size} but the signed manifest record seq {seq} says {info.size}"
                self.bad(name, reason, device_id, seq)
            else:
                self.checked["media"] += 1
        referenced = {name for _, _, name in evidence}
        for name in self.digests:
            if name.startswith("media/") and name not in referenced:
                self.bad(name, "is not an evidence item of the manifest")
