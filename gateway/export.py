"""Exporting a case bundle: one zip a supervisor can verify without trusting the gateway.

The layout and the checks are ``protocol.bundle``'s; this module only fills it from the
database, the blob store and the transparency log. Everything is read inside one SQLite
read transaction, so the journal rows, evidence rows and the tree head all describe the
same moment even while ingest keeps appending.

It must never change evidence, the journal or the log (the only write is the audit row
that says who exported what), never hold a media file in memory, and never leave a
half-written bundle under the requested name: it writes a temp file beside it, fsyncs,
and renames.
"""

from __future__ import annotations

import hashlib
import html
import json
import mimetypes
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import sqlite_utils

from gateway import audit
from gateway.api_cases import iso
from gateway.blobs import BlobStore, fsync_dir
from gateway.datadir import DataDir
from gateway.db import transaction
from gateway.errors import GatewayError
from gateway.outgoing import now_ms
from gateway.translog import TransparencyLog
from protocol import bundle
from protocol.encoding import canonical
from protocol.receipt import SignedTreeHead

BLOCK = 1024 * 1024
#: Media types whose usual extension ``mimetypes`` gets wrong or does not know everywhere.
EXTENSIONS = {
    "video/mp4": "mp4",
    "audio/mp4": "m4a",
    "image/jpeg": "jpg",
    "application/octet-stream": "bin",
    "text/plain": "txt",
}


class ExportError(GatewayError):
    """The bundle cannot be made as asked (unknown evidence, a damaged blob)."""


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    media: int
    media_bytes: int
    journal_records: int
    proofs: int
    devices: int
    tree_size: int
    manifest_sha256: str


@dataclass(frozen=True)
class _Item:
    evidence_id: int
    device_id: str
    seq: int
    kind: str
    media_type: str
    name: str
    sha256: str
    size: int
    captured_ms: int
    received_ms: int
    log_index: int

    @property
    def member(self) -> str:
        return bundle.media_name(
            self.device_id, self.seq, self.sha256, media_extension(self.media_type)
        )


def media_extension(media_type: str) -> str:
    if media_type in EXTENSIONS:
        return EXTENSIONS[media_type]
    guessed = (mimetypes.guess_extension(media_type, strict=False) or "").lstrip(".")
    return guessed if re.fullmatch(r"[a-z0-9]{1,8}", guessed) else "bin"


def export_bundle(
    data: DataDir,
    db: sqlite_utils.Database,
    evidence: Sequence[tuple[str, int]],
    out: Path,
    *,
    case: Mapping[str, Any] | None = None,
    coverage: Mapping[str, Any] | None = None,
    coverage_html: str | None = None,
    actor: str = "cli",
) -> ExportSummary:
    """Write the bundle for ``evidence`` ((device_id, seq) of evidence rows) to ``out``.

    Raises ``ExportError`` for evidence the gateway does not hold or a blob whose bytes no
    longer match their hash (the bundle would fail verification; the store needs repair).
    """
    wanted = sorted(set(evidence))
    if not wanted:
        raise ExportError("nothing to export: no evidence items were given")
    key = data.signing_key()
    out = out.resolve()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with _snapshot(db), zipfile.ZipFile(fh, "w") as zf:
                items = [_item(db, device_id, seq) for device_id, seq in wanted]
                log = TransparencyLog(db, key)
                head = log.tree_head(now_ms())
                writer = _BundleWriter(zf, head.timestamp_ms)
                counts = _write_bundle(writer, data, db, log, head, items)
                writer.text(bundle.CASE, _json_text(_no_case(items) if case is None else case))
                writer.text(bundle.COVERAGE, _json_text(coverage or _no_coverage()))
                writer.text(bundle.COVERAGE_HTML, coverage_html or _listing_html(case, items))
                manifest = writer.manifest(head, items, counts.ranges)
                writer.text(bundle.MANIFEST, manifest.decode())
                writer.text(bundle.MANIFEST_SIG, key.sign(manifest).hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    try:
        _audit(db, actor, out, items)
    except BaseException:
        out.unlink(missing_ok=True)  # no unaudited access to evidence (Guarantee 4)
        raise
    return ExportSummary(
        out,
        len(items),
        sum(i.size for i in items),
        counts.records,
        counts.proofs,
        len(counts.ranges),
        head.tree_size,
        hashlib.sha256(manifest).hexdigest(),
    )


@contextmanager
def _snapshot(db: sqlite_utils.Database) -> Iterator[None]:
    """One read transaction: in WAL mode every query inside sees the same commit."""
    conn = db.conn
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")


def _item(db: sqlite_utils.Database, device_id: str, seq: int) -> _Item:
    row = db.execute(
        "SELECT id, kind, media_type, name, sha256, size, captured_ms, received_ms, log_index "
        "FROM evidence WHERE device_id = ? AND seq = ? AND verified = 1",
        [device_id, seq],
    ).fetchone()
    if row is None:
        raise ExportError(
            f"{device_id} seq {seq} is not verified evidence at this gateway (not received "
            "yet, not a media record, or rejected); check GET /api/v1/evidence"
        )
    return _Item(
        row[0], device_id, seq, row[1], row[2], row[3] or "", row[4], int(row[5]),
        int(row[6] or 0), int(row[7]), int(row[8]),
    )  # fmt: skip


@dataclass
class _Counts:
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    records: int = 0
    proofs: int = 0


def _write_bundle(
    writer: _BundleWriter,
    data: DataDir,
    db: sqlite_utils.Database,
    log: TransparencyLog,
    head: SignedTreeHead,
    items: list[_Item],
) -> _Counts:
    counts = _Counts()
    writer.text(bundle.GATEWAY_PUB, log.key.verify_key.hex + "\n")
    writer.text(bundle.TREE_HEAD, _json_text(head.to_wire()))
    if (data.ca_dir / "ca.crt").exists():
        writer.text("certs/ca.pem", (data.ca_dir / "ca.crt").read_text())
    for device_id in sorted({i.device_id for i in items}):
        mine = [i for i in items if i.device_id == device_id]
        first, last = mine[0].seq, mine[-1].seq
        counts.ranges[device_id] = (first, last)
        writer.text(bundle.keys_name(device_id), _json_text(_key_history(db, device_id)))
        writer.text(f"certs/{device_id}.json", _json_text(_certificates(db, device_id)))
        rows = db.execute(
            "SELECT record FROM journal WHERE device_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            [device_id, first, last],
        )
        counts.records += writer.lines(bundle.journal_name(device_id), (r[0] for r in rows))
        counts.proofs += writer.lines(
            bundle.proofs_name(device_id), _proofs(db, log, head, device_id, first, last, mine)
        )
    blobs = BlobStore(data.blobs)
    for item in items:
        writer.media(item, blobs.path(item.sha256))
    return counts


def _proofs(
    db: sqlite_utils.Database,
    log: TransparencyLog,
    head: SignedTreeHead,
    device_id: str,
    first: int,
    last: int,
    items: list[_Item],
) -> Iterator[str]:
    rows = db.execute(
        "SELECT seq, log_index FROM journal WHERE device_id = ? AND seq BETWEEN ? AND ? "
        "AND log_index IS NOT NULL ORDER BY seq",
        [device_id, first, last],
    ).fetchall()
    entries = [("record", int(seq), int(index)) for seq, index in rows]
    entries += [("evidence", i.seq, i.log_index) for i in items]
    for leaf_type, seq, index in entries:
        leaf = db.execute("SELECT leaf FROM log_leaves WHERE idx = ?", [index]).fetchone()[0]
        path = log.inclusion(index, head.tree_size)
        entry = bundle.proof_entry(leaf_type, device_id, seq, index, leaf.encode(), path)
        yield canonical(entry).decode()


def _key_history(db: sqlite_utils.Database, device_id: str) -> dict[str, Any]:
    """Which key signs which seqs: ``device_keys`` rows (enrollment, then one per
    ``key_rotation``), or the registered key alone for devices enrolled before it."""
    rows = db.execute(
        "SELECT from_seq, public_key, at_ms FROM device_keys WHERE device_id = ? ORDER BY from_seq",
        [device_id],
    ).fetchall()
    if not rows:
        device = db.execute(
            "SELECT public_key FROM devices WHERE device_id = ?", [device_id]
        ).fetchone()
        if device is None:
            raise ExportError(f"{device_id} is not an enrolled device at this gateway")
        rows = [(1, device[0], None)]
    keys = []
    for i, (from_seq, public_key, at_ms) in enumerate(rows):
        to_seq = int(rows[i + 1][0]) - 1 if i + 1 < len(rows) else None
        entry = {"from_seq": int(from_seq), "to_seq": to_seq, "public_key": public_key}
        keys.append(entry if at_ms is None else {**entry, "at_ms": int(at_ms)})
    return {"device_id": device_id, "keys": keys}


def _certificates(db: sqlite_utils.Database, device_id: str) -> dict[str, Any]:
    rows = db.execute(
        "SELECT serial, issued_at, not_after, revoked FROM certificates WHERE device_id = ? "
        "ORDER BY issued_at",
        [device_id],
    ).fetchall()
    return {
        "device_id": device_id,
        "issuer": "certs/ca.pem",
        "certificates": [
            {"serial": r[0], "issued_at": r[1], "not_after": r[2], "revoked": bool(r[3])}
            for r in rows
        ],
    }


def _audit(db: sqlite_utils.Database, actor: str, out: Path, items: list[_Item]) -> None:
    """One row per exported item, in the hash-chained audit log (``gateway.audit``)."""
    with transaction(db) as conn:
        for i in items:
            audit.record(
                conn,
                actor,
                "export_item",
                f"evidence/{i.device_id}/{i.seq}",
                now_ms(),
                {"evidence_id": i.evidence_id, "bundle": out.name},
            )


class _BundleWriter:
    """Zip members with their sha256 and size recorded for the manifest as they go."""

    def __init__(self, zf: zipfile.ZipFile, at_ms: int) -> None:
        self.zip = zf
        self.date = time.gmtime(at_ms / 1000)[:6]
        self.at_ms = at_ms
        self.files: dict[str, dict[str, Any]] = {}

    def _open(self, name: str, compress: bool, size: int | None = None) -> IO[bytes]:
        info = zipfile.ZipInfo(name, date_time=self.date)
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        if size is not None:
            info.file_size = size  # lets zipfile pick zip64 for large media up front
        return self.zip.open(info, "w", force_zip64=size is None)

    def _write(self, name: str, blocks: Iterable[bytes], compress: bool, size: int | None) -> str:
        digest, total = hashlib.sha256(), 0
        with self._open(name, compress, size) as member:
            for block in blocks:
                digest.update(block)
                total += len(block)
                member.write(block)
        if name not in (bundle.MANIFEST, bundle.MANIFEST_SIG):
            self.files[name] = {"sha256": digest.hexdigest(), "size": total}
        return digest.hexdigest()

    def text(self, name: str, text: str) -> None:
        data = text.encode()
        self._write(name, [data], True, len(data))

    def lines(self, name: str, lines: Iterable[str]) -> int:
        count = 0

        def encoded() -> Iterator[bytes]:
            nonlocal count
            for line in lines:
                count += 1
                yield line.encode() + b"\n"

        self._write(name, encoded(), True, None)
        return count

    def media(self, item: _Item, path: Path) -> None:
        def blocks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(BLOCK):
                    yield block

        try:
            got = self._write(item.member, blocks(), False, item.size)
        except FileNotFoundError as exc:
            raise ExportError(
                f"the blob of {item.device_id} seq {item.seq} is missing from {path.parent}: "
                "the blob store is damaged; restore it from backup"
            ) from exc
        if got != item.sha256 or self.files[item.member]["size"] != item.size:
            raise ExportError(
                f"the blob of {item.device_id} seq {item.seq} ({path}) has sha256 {got[:16]}… "
                f"but was stored as {item.sha256[:16]}…: the blob store is damaged; restore "
                "it from backup before exporting"
            )

    def manifest(
        self, head: SignedTreeHead, items: list[_Item], ranges: dict[str, tuple[int, int]]
    ) -> bytes:
        return canonical(
            {
                "v": bundle.BUNDLE_VERSION,
                "bundle": bundle.BUNDLE_KIND,
                "exported_at_ms": self.at_ms,
                "tree_size": head.tree_size,
                "files": self.files,
                "evidence": [
                    {"device_id": i.device_id, "seq": i.seq, "media": i.member} for i in items
                ],
                "journal": {d: {"first_seq": a, "last_seq": b} for d, (a, b) in ranges.items()},
            }
        )


def _json_text(value: Mapping[str, Any]) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def _no_case(items: list[_Item]) -> dict[str, Any]:
    return {
        "case_id": None,
        "note": "explicit evidence export, not bound to a case",
        "evidence": [{"device_id": i.device_id, "seq": i.seq} for i in items],
    }


def _no_coverage() -> dict[str, Any]:
    return {"computed": False, "note": "coverage belongs to case steps; none were exported"}


def _iso(ms: int) -> str:
    """To the second, in UTC; a time that is no date as its raw milliseconds, marked
    (``gateway.api_cases.not_a_date``), so a bundle of such a record is still written."""
    return iso(ms, "seconds") or ""


def _listing_html(case: Mapping[str, Any] | None, items: list[_Item]) -> str:
    """A page a reader can open from the unpacked zip: what is here, and where."""
    e = html.escape
    title = f"Case {case.get('case_id')}" if case and case.get("case_id") else "Evidence export"
    rows = "".join(
        f"<tr><td>{e(i.device_id)}</td><td>{i.seq}</td><td>{e(i.kind)}</td>"
        f"<td>{e(i.name)}</td><td>{_iso(i.captured_ms)}</td><td>{_iso(i.received_ms)}</td>"
        f'<td>{i.size}</td><td><a href="{e(i.member)}"><code>{i.sha256[:16]}…</code></a></td></tr>'
        for i in items
    )
    return (
        f"<!doctype html><meta charset=utf-8><title>{e(title)}</title><h1>{e(title)}</h1>"
        f"<p>{len(items)} evidence items. Check this bundle with "
        "<code>custody verify BUNDLE.zip --gateway-key HEX</code> before relying on it.</p>"
        "<table border=1 cellpadding=4><tr><th>device</th><th>seq</th><th>kind</th>"
        "<th>name</th><th>captured (device clock, UTC)</th><th>received (UTC)</th>"
        f"<th>bytes</th><th>sha256</th></tr>{rows}</table>\n"
    )
