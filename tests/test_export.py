"""Case bundles end to end: exported from a real gateway that received real uploads, then
verified, then tampered with in every way a supervisor must notice.

One broker, gateway and two agents serve the whole module (the same ``Broker``,
``Gateway`` and ``AgentProc`` the ``gateway``/``make_agent`` fixtures build): the bundle
is made once and each test tampers with its own rewritten copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.service import Device
from custody_cli.bundle import CaseResolver, ZipBundle, add_parsers, cmd_export, cmd_verify
from gateway.datadir import DataDir
from gateway.db import connect
from gateway.export import ExportError, export_bundle
from protocol.bundle import Verdict, verify_bundle
from protocol.encoding import canonical
from protocol.signing import SigningKey, VerifyKey
from tests.conftest import AgentProc, Broker, Gateway, make_files, run_custody, wait_for


@dataclass
class Live:
    gateway: Gateway
    bundle: Path
    key: VerifyKey
    exported: dict[str, list[int]]  # device -> exported evidence seqs
    all_seqs: dict[str, list[int]]  # device -> every evidence seq at the gateway


def _agent(device_id: str, gateway: Gateway, tmp: Path) -> AgentProc:
    out = tmp / "devices" / device_id
    gw, broker = str(gateway.data), gateway.broker.url
    result = run_custody(
        "enroll", device_id, "--gateway-data", gw, "--out", str(out), "--broker", broker
    )
    assert result.returncode == 0, result.stderr
    return AgentProc(device_id, out / "agent.toml", tmp / f"{device_id}.log", {})


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("export")
    gateway_dir = DataDir.open(tmp / "gateway").root
    broker = Broker(tmp / "broker", tls_dir=gateway_dir / "ca")
    broker.start()
    gateway = Gateway(gateway_dir, broker, tmp / "gateway.log")
    agents: list[AgentProc] = []
    try:
        gateway.start()
        cam1, cam2 = _agent("cam-1", gateway, tmp), _agent("cam-2", gateway, tmp)
        agents += [cam1, cam2]
        cam1.add(*make_files(tmp / "a", [0, 5000, 300_000], seed=1).values())
        device = Device(load_config(cam1.config))
        try:
            device.rotate_signing_key()  # the exported range must span a key hand-over
        finally:
            device.close()
        cam1.add(*make_files(tmp / "b", [1000, 70_000], seed=2).values())
        cam2.add(*make_files(tmp / "c", [2000, 40_000], seed=3).values())
        for agent, n in ((cam1, 5), (cam2, 2)):
            agent.start()

            def arrived(device_id: str = agent.device_id, n: int = n) -> bool:
                return len(gateway.evidence(device_id)) == n

            wait_for(arrived, 60, f"{n} evidence items of {agent.device_id} at the gateway")
        all_seqs = {d: sorted(e["seq"] for e in gateway.evidence(d)) for d in ("cam-1", "cam-2")}
        # cam-1: its second and last items, so the journal range has records and media in
        # between that are not exported, and the key rotation inside it.
        exported = {
            "cam-1": [all_seqs["cam-1"][1], all_seqs["cam-1"][-1]],
            "cam-2": all_seqs["cam-2"],
        }
        data = DataDir.open(gateway_dir, create=False)
        db = connect(data.db_path)
        try:
            summary = export_bundle(
                data,
                db,
                [(d, s) for d, seqs in exported.items() for s in seqs],
                tmp / "case.zip",
                case={"case_id": "C-2024-17", "title": "Market inspection"},
            )
        finally:
            db.conn.close()
        assert summary.media == 4 and summary.devices == 2
        yield Live(gateway, summary.path, data.signing_key().verify_key, exported, all_seqs)
    finally:
        for agent in agents:
            agent.stop()
        gateway.stop()
        broker.stop()


# -- helpers: read, tamper, rewrite, verify ------------------------------------------------


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def rewrite(files: dict[str, bytes], path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def check(path: Path, key: VerifyKey | None) -> Verdict:
    with zipfile.ZipFile(path) as zf:
        return verify_bundle(ZipBundle(zf), key)


def resign(files: dict[str, bytes], key: SigningKey) -> None:
    """What a dishonest gateway can do: rehash the members and sign the manifest again."""
    manifest = json.loads(files["manifest.json"])
    manifest["files"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in files.items()
        if name not in ("manifest.json", "manifest.sig")
    }
    files["manifest.json"] = canonical(manifest)
    files["manifest.sig"] = key.sign(files["manifest.json"]).hex().encode()


def journal_lines(files: dict[str, bytes], device_id: str) -> list[bytes]:
    return files[f"journal/{device_id}.jsonl"].splitlines()


def media_member(files: dict[str, bytes], device_id: str, seq: int) -> str:
    return next(n for n in files if n.startswith(f"media/{device_id}/{seq}-"))


def named(verdict: Verdict, item: str, *, seq: int | None = None, says: str = "") -> bool:
    return any(
        p.item == item and (seq is None or p.seq == seq) and says in p.reason
        for p in verdict.problems
    )


def problems(verdict: Verdict) -> str:
    return "\n".join(map(str, verdict.problems))


# -- the untouched bundle ------------------------------------------------------------------


def test_untouched_bundle_verifies_with_the_pinned_key_and_with_its_own(live: Live):
    verdict = check(live.bundle, live.key)
    assert verdict.ok, problems(verdict)
    files = read_members(live.bundle)
    first, last = live.exported["cam-1"]
    records = len(journal_lines(files, "cam-1")) + len(journal_lines(files, "cam-2"))
    assert verdict.checked["media"] == 4
    assert verdict.checked["journal_records"] == records
    assert verdict.checked["proofs"] == records + 4
    assert verdict.headline().startswith(
        f"VERIFIED: 4 media, {records} journal records, {records + 4} proofs against tree "
        f"head of size {verdict.tree_size} signed by {live.key.hex[:16]}… (pinned key)"
    )
    unpinned = check(live.bundle, None)
    assert unpinned.ok and unpinned.key_source == "bundle"
    assert "not pinned" in unpinned.headline()
    assert verify_bundle(files, live.key).ok  # a plain mapping of members works too

    # The journal is contiguous over the exported range, across the key hand-over.
    seqs = [json.loads(line)["seq"] for line in journal_lines(files, "cam-1")]
    assert seqs == list(range(first, last + 1))
    kinds = [json.loads(line)["kind"] for line in journal_lines(files, "cam-1")]
    assert "key_rotation" in kinds
    keys = json.loads(files["keys/cam-1.json"])["keys"]
    assert len(keys) == 2 and keys[0]["to_seq"] == keys[1]["from_seq"] - 1
    # Only the exported media are in it (their bytes match the signed records: checked).
    media = sorted(n for n in files if n.startswith("media/"))
    assert len(media) == 4
    not_exported = set(live.all_seqs["cam-1"]) - set(live.exported["cam-1"])
    assert not any(n.startswith(f"media/cam-1/{s}-") for s in not_exported for n in media)
    for name in ("gateway.pub", "tree_head.json", "case.json", "coverage.json", "coverage.html"):
        assert name in files
    assert json.loads(files["case.json"])["case_id"] == "C-2024-17"
    assert "C-2024-17" in files["coverage.html"].decode()
    assert files["gateway.pub"].decode().strip() == live.key.hex


def test_export_is_audited_and_refuses_evidence_it_does_not_hold(live: Live, tmp_path: Path):
    db = sqlite3.connect(live.gateway.data / "custody.db")
    try:
        audited = db.execute("SELECT count(*) FROM audit WHERE action = 'export_item'").fetchone()[
            0
        ]
    finally:
        db.close()
    assert audited >= 4
    data = DataDir.open(live.gateway.data, create=False)
    gdb = connect(data.db_path)
    try:
        with pytest.raises(ExportError, match="cam-1 seq 999 is not verified evidence"):
            export_bundle(data, gdb, [("cam-1", 999)], tmp_path / "x.zip")
    finally:
        gdb.conn.close()
    assert list(tmp_path.iterdir()) == []  # no half-written bundle, no temp file left


# -- tampering: each caught, and named -----------------------------------------------------


def test_a_flipped_byte_in_a_media_file_names_that_file(live: Live, tmp_path: Path):
    files = read_members(live.bundle)
    seq = live.exported["cam-1"][-1]
    name = media_member(files, "cam-1", seq)
    data = bytearray(files[name])
    data[len(data) // 2] ^= 0x01
    files[name] = bytes(data)
    verdict = check(rewrite(files, tmp_path / "t.zip"), live.key)
    assert not verdict.ok
    assert named(verdict, name, says="but the manifest says"), problems(verdict)
    assert named(verdict, name, seq=seq, says=f"the signed manifest record seq {seq} says")


def test_a_flipped_byte_in_a_journal_record_names_device_and_seq(live: Live, tmp_path: Path):
    files = read_members(live.bundle)
    lines = journal_lines(files, "cam-1")
    i = len(lines) // 2
    seq = json.loads(lines[i])["seq"]
    for at in (len(lines[i]) // 2, lines[i].index(b'"sig":"') + 10):
        line = bytearray(lines[i])
        line[at] ^= 0x01
        tampered = dict(files)
        tampered["journal/cam-1.jsonl"] = b"\n".join([*lines[:i], bytes(line), *lines[i + 1 :]])
        verdict = check(rewrite(tampered, tmp_path / "t.zip"), live.key)
        assert named(verdict, "journal/cam-1.jsonl", says="the manifest says")
        assert any(p.device_id == "cam-1" and p.seq == seq for p in verdict.problems), (
            f"flip at {at}:\n{problems(verdict)}"
        )


def test_a_flipped_byte_in_a_proof_names_the_proof(live: Live, tmp_path: Path):
    files = read_members(live.bundle)
    lines = files["proofs/cam-1.jsonl"].splitlines()
    seq = live.exported["cam-1"][0]
    i = next(
        k
        for k, line in enumerate(lines)
        if json.loads(line)["seq"] == seq and json.loads(line)["leaf_type"] == "evidence"
    )
    entry = json.loads(lines[i])
    h = entry["inclusion_proof"][0]
    entry["inclusion_proof"][0] = ("1" if h[0] != "1" else "2") + h[1:]
    lines[i] = canonical(entry)
    files["proofs/cam-1.jsonl"] = b"\n".join(lines) + b"\n"
    verdict = check(rewrite(files, tmp_path / "t.zip"), live.key)
    assert named(verdict, "proofs/cam-1.jsonl", says="the manifest says"), problems(verdict)
    assert named(
        verdict,
        "proofs/cam-1.jsonl",
        seq=seq,
        says="inclusion proof does not lead to the signed root",
    ), problems(verdict)


def test_a_record_removed_from_the_middle_is_reported_missing(live: Live, tmp_path: Path):
    files = read_members(live.bundle)
    lines = journal_lines(files, "cam-1")
    i = len(lines) // 2
    seq = json.loads(lines[i])["seq"]
    files["journal/cam-1.jsonl"] = b"\n".join(lines[:i] + lines[i + 1 :]) + b"\n"
    verdict = check(rewrite(files, tmp_path / "t.zip"), live.key)
    assert named(
        verdict,
        "journal/cam-1.jsonl",
        seq=seq,
        says=f"seq {seq} is missing between {seq - 1} and {seq + 1}",
    ), problems(verdict)


def test_case_file_edits_and_added_or_removed_members_are_caught(live: Live, tmp_path: Path):
    files = read_members(live.bundle)
    case = json.loads(files["case.json"])
    case["title"] = "Something else"
    files["case.json"] = json.dumps(case).encode()
    files["media/cam-2/99-planted.bin"] = b"not evidence"
    del files["coverage.json"]
    verdict = check(rewrite(files, tmp_path / "t.zip"), live.key)
    assert named(verdict, "case.json", says="but the manifest says")
    assert named(verdict, "media/cam-2/99-planted.bin", says="not in the signed manifest")
    assert named(verdict, "coverage.json", says="missing from the bundle"), problems(verdict)


def test_a_wrong_pinned_gateway_key_fails_on_the_signatures(live: Live):
    stranger = SigningKey.generate().verify_key
    verdict = check(live.bundle, stranger)
    assert not verdict.ok and verdict.key_source == "pinned"
    assert named(verdict, "manifest.sig", says="not signed by the gateway key")
    assert named(verdict, "tree_head.json", says="signature invalid")
    assert named(verdict, "gateway.pub", says="the pinned key is")
    assert verdict.headline() == f"FAILED: {len(verdict.problems)} problems"


# -- a gateway that re-signs its own manifest still cannot alter evidence ------------------


def test_a_re_signed_bundle_still_cannot_hide_altered_media_or_records(live: Live, tmp_path: Path):
    key = DataDir(live.gateway.data).signing_key()
    files = read_members(live.bundle)
    seq = live.exported["cam-2"][-1]
    name = media_member(files, "cam-2", seq)
    files[name] = files[name][:-1] + bytes([files[name][-1] ^ 0xFF])
    lines = journal_lines(files, "cam-1")
    removed = json.loads(lines[1])["seq"]
    files["journal/cam-1.jsonl"] = b"\n".join(lines[:1] + lines[2:]) + b"\n"
    resign(files, key)
    verdict = check(rewrite(files, tmp_path / "t.zip"), live.key)
    assert not any(p.item in ("manifest.json", "manifest.sig") for p in verdict.problems)
    assert named(verdict, name, seq=seq, says="the signed manifest record"), problems(verdict)
    assert named(verdict, "journal/cam-1.jsonl", seq=removed, says="missing")


def test_a_re_signed_key_history_cannot_smuggle_in_a_key(live: Live, tmp_path: Path):
    key = DataDir(live.gateway.data).signing_key()
    files = read_members(live.bundle)
    history = json.loads(files["keys/cam-1.json"])
    history["keys"][1]["public_key"] = SigningKey.generate().verify_key.hex
    files["keys/cam-1.json"] = json.dumps(history).encode()
    resign(files, key)
    verdict = check(rewrite(files, tmp_path / "t.zip"), live.key)
    assert named(verdict, "keys/cam-1.json", says="hands the journal over"), problems(verdict)
    assert any("device signature does not verify" in p.reason for p in verdict.problems)


# -- the commands --------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="custody")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_export_and_verify_commands(live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "explicit.zip"
    first, last = live.all_seqs["cam-2"][0], live.all_seqs["cam-2"][-1]
    gw = str(live.gateway.data)
    args = parse(
        "export",
        "--device",
        "cam-2",
        "--seq-range",
        f"{first}-{last}",
        "--out",
        str(out),
        "--gateway-data",
        gw,
    )
    assert cmd_export(args) == 0, capsys.readouterr().err
    assert "exported 2 media" in capsys.readouterr().out

    assert cmd_verify(parse("verify", str(out), "--gateway-key", live.key.hex)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("VERIFIED: 2 media,") and len(lines) == 1

    files = read_members(out)
    name = media_member(files, "cam-2", first)
    files[name] = b"x" + files[name][1:]
    assert cmd_verify(parse("verify", str(rewrite(files, tmp_path / "bad.zip")))) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"FAILED: {len(lines) - 1} problems" and any(name in x for x in lines[1:])

    (tmp_path / "not.zip").write_bytes(b"hello")
    assert cmd_verify(parse("verify", str(tmp_path / "not.zip"))) == 2
    assert cmd_verify(parse("verify", str(rewrite({"a.txt": b"a"}, tmp_path / "a.zip")))) == 2
    assert "not a custody bundle" in capsys.readouterr().err


def test_export_by_case_goes_through_the_resolver_hook(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    gw = str(live.gateway.data)
    args = parse("export", "C-9", "--out", str(tmp_path / "case.zip"), "--gateway-data", gw)
    assert cmd_export(args) == 2
    assert "--device" in capsys.readouterr().err

    seen: list[str] = []

    def resolve(db: Any, case_id: str) -> Any:
        seen.append(case_id)
        items = [("cam-1", s) for s in live.exported["cam-1"]]
        return {"case_id": case_id}, items, {"steps": [{"covered_pct": 100}]}, "<p>cov</p>"

    hook: CaseResolver = resolve
    assert cmd_export(args, resolve_case=hook) == 0, capsys.readouterr().err
    files = read_members(tmp_path / "case.zip")
    assert seen == ["C-9"] and json.loads(files["case.json"]) == {"case_id": "C-9"}
    assert files["coverage.html"] == b"<p>cov</p>"
    assert check(tmp_path / "case.zip", live.key).ok


def test_a_damaged_zip_entry_is_a_problem_not_a_crash(live: Live, tmp_path: Path):
    """A byte flipped in the zip file itself (not rewritten): the entry's CRC fails."""
    files = read_members(live.bundle)
    name = media_member(files, "cam-1", live.exported["cam-1"][-1])
    raw = bytearray(live.bundle.read_bytes())
    at = raw.index(files[name][1000:1064]) + 10  # media is stored uncompressed
    raw[at] ^= 0x01
    (tmp_path / "crc.zip").write_bytes(bytes(raw))
    verdict = check(tmp_path / "crc.zip", live.key)
    assert [str(p) for p in verdict.problems] == [
        f"{name}: cannot be read: Bad CRC-32 for file {name!r}"
    ]
