"""``custody export`` and ``custody verify``: case bundles out of the gateway, and checked.

    custody export CASE_ID --out case.zip --gateway-data DIR
    custody export --device ID [--device ID …] [--seq-range A-B …] --out case.zip --gateway-data DIR
    custody verify case.zip [--gateway-key HEX]

``export`` runs on the gateway machine (it signs with the gateway key). ``verify`` needs
nothing but the zip (and, to know the bundle came from *your* gateway, its public key):
exit 0 verified, 1 not verified (one line per problem), 2 not a readable bundle.

Cases are resolved by a hook (``CaseResolver``) that the case-binding code supplies;
without one, ``export`` takes explicit evidence by device and seq range.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

# Imported where used: `custody agent` on a device must not pay for export's imports.
if TYPE_CHECKING:
    import sqlite_utils

    from protocol.signing import VerifyKey

#: (db, case_id) -> (case, evidence as (device_id, seq), coverage, coverage_html).
#: Raises ``GatewayError`` (or a subclass) for an unknown case.
CaseResolver: TypeAlias = (
    "Callable[[sqlite_utils.Database, str], tuple[Mapping[str, Any], "
    "Sequence[tuple[str, int]], Mapping[str, Any] | None, str | None]]"
)

BLOCK = 1024 * 1024


def _seq_range(value: str) -> tuple[int, int]:
    first, sep, last = value.partition("-")
    if not (first.isdigit() and (not sep or last.isdigit())):
        raise argparse.ArgumentTypeError(f"{value!r} is not A-B or N (e.g. 12-40)")
    from protocol.journal import SEQ_MAX

    if len(first) > 19 or len(last) > 19:  # int() of thousands of digits raises
        raise argparse.ArgumentTypeError(f"{value!r}: sequence numbers go up to {SEQ_MAX}")
    a, b = int(first), int(last or first)
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"{value!r}: need 1 <= A <= B")
    if b > SEQ_MAX:  # past what SQLite holds: the query raised OverflowError
        raise argparse.ArgumentTypeError(f"{value!r}: sequence numbers go up to {SEQ_MAX}")
    return a, b


def _gateway_key(value: str) -> VerifyKey:
    from protocol.errors import ProtocolError
    from protocol.signing import VerifyKey

    try:
        return VerifyKey.from_hex(value.strip().lower())
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(
            f"not a gateway public key ({exc}); use the 64 hex digits of DIR/gateway.pub"
        ) from exc


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser(
        "export", help="write a case bundle that can be verified without the gateway"
    )
    ex.add_argument("case_id", nargs="?", metavar="CASE_ID", help="the case to export")
    ex.add_argument("--out", type=Path, required=True, help="the zip to write")
    ex.add_argument("--gateway-data", type=Path, required=True, help="gateway data directory")
    ex.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="ID",
        help="export this device's evidence instead of a case (repeatable)",
    )
    ex.add_argument(
        "--seq-range",
        action="append",
        default=[],
        type=_seq_range,
        metavar="A-B",
        help="only journal seqs A..B: one range for every --device, or one per --device",
    )
    ve = sub.add_parser("verify", help="check a case bundle: signatures, chain, proofs, media")
    ve.add_argument("bundle", type=Path, metavar="BUNDLE.zip")
    ve.add_argument(
        "--gateway-key",
        type=_gateway_key,
        metavar="HEX",
        help="the gateway public key you trust (DIR/gateway.pub); without it the bundle's "
        "own key is used, which proves integrity but not origin",
    )


def commands() -> dict[str, Callable[[argparse.Namespace], int]]:
    def export_case(args: argparse.Namespace) -> int:
        from gateway.api_cases import resolve_case

        return cmd_export(args, resolve_case)

    return {"export": export_case, "verify": cmd_verify}


def cmd_export(args: argparse.Namespace, resolve_case: CaseResolver | None = None) -> int:
    from gateway.datadir import DataDir
    from gateway.db import connect
    from gateway.errors import GatewayError
    from gateway.export import export_bundle

    def fail(message: str, status: int = 2) -> int:
        print(f"custody export: {message}", file=sys.stderr)
        return status

    if bool(args.case_id) == bool(args.device):
        return fail("name either a CASE_ID or at least one --device ID")
    if args.seq_range and len(args.seq_range) not in (1, len(args.device)):
        return fail("give one --seq-range for every device, or one per --device, in order")
    if args.case_id and resolve_case is None:
        return fail(
            "cases cannot be exported by this version yet; export the evidence itself with "
            "--device ID [--seq-range A-B]"
        )
    try:
        data = DataDir.open(args.gateway_data, create=False)
        db = connect(data.db_path)
        try:
            case: Mapping[str, Any] | None = None
            coverage: Mapping[str, Any] | None = None
            coverage_html: str | None = None
            if args.case_id:
                assert resolve_case is not None
                case, evidence, coverage, coverage_html = resolve_case(db, args.case_id)
            else:
                evidence = _explicit_evidence(db, args.device, args.seq_range)
                if not evidence:
                    return fail(f"no verified evidence of {', '.join(args.device)} in that range")
            summary = export_bundle(
                data,
                db,
                evidence,
                args.out,
                case=case,
                coverage=coverage,
                coverage_html=coverage_html,
            )
        finally:
            db.conn.close()
    except GatewayError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write {args.out}: {exc}", 1)
    print(
        f"exported {summary.media} media ({summary.media_bytes} bytes), "
        f"{summary.journal_records} journal records and {summary.proofs} proofs of "
        f"{summary.devices} device(s) against tree head of size {summary.tree_size} "
        f"to {summary.path}"
    )
    print(f"check it with: custody verify {summary.path} --gateway-key {data.public_key_hex()}")
    return 0


def _explicit_evidence(
    db: sqlite_utils.Database, devices: list[str], ranges: list[tuple[int, int]]
) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for i, device_id in enumerate(devices):
        first, last = ranges[i if len(ranges) > 1 else 0] if ranges else (1, 2**63 - 1)
        rows = db.execute(
            "SELECT seq FROM evidence WHERE device_id = ? AND seq BETWEEN ? AND ? "
            "AND verified = 1 ORDER BY seq",
            [device_id, first, last],
        ).fetchall()
        found.extend((device_id, int(r[0])) for r in rows)
    return found


class ZipBundle:
    """A ``protocol.bundle.BundleReader`` over a zip file: members read in blocks."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self.zf = zf

    def names(self) -> list[str]:
        return [info.filename for info in self.zf.infolist()]

    def blocks(self, name: str) -> Iterator[bytes]:
        from protocol.bundle import MemberUnreadable

        try:
            with self.zf.open(name) as member:
                while block := member.read(BLOCK):
                    yield block
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise MemberUnreadable(str(exc)) from exc


def cmd_verify(args: argparse.Namespace) -> int:
    from protocol.bundle import MANIFEST, verify_bundle

    try:
        zf = zipfile.ZipFile(args.bundle)
    except (OSError, zipfile.BadZipFile) as exc:
        print(f"custody verify: {args.bundle} cannot be read as a zip: {exc}", file=sys.stderr)
        return 2
    with zf:
        if MANIFEST not in zf.namelist():
            print(
                f"custody verify: {args.bundle} is not a custody bundle (no {MANIFEST})",
                file=sys.stderr,
            )
            return 2
        verdict = verify_bundle(ZipBundle(zf), args.gateway_key)
    print(verdict.headline())
    for problem in verdict.problems:
        print(f"  {problem}")
    return 0 if verdict.ok else 1
