"""The firmware bridge: a frame decoder that survives any byte sequence, and a serial link
that works over a real pseudo-terminal, resynchronises after garbage, and comes back when
the port vanishes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import link as link_module
from firmware_bridge.frames import SOF, Frame, FrameDecoder, crc16
from firmware_bridge.link import SerialLink
from firmware_bridge.messages import (
    BadPayload,
    BatteryEvent,
    Button,
    ButtonEvent,
    CommandAck,
    DeviceInfo,
    DockEvent,
    FrameType,
    GetInfo,
    GpsFix,
    Led,
    StorageEvent,
    TamperEvent,
    TemperatureEvent,
    encode_event,
    parse_event,
    parse_nmea,
)
from simulators.mcu import McuSimulator
from tests.conftest import wait_for

frames_st = st.builds(
    Frame,
    type=st.integers(0, 255),
    seq=st.integers(0, 255),
    payload=st.binary(max_size=300),
)


def test_crc_known_answer():
    assert crc16(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE check value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000), st.lists(st.integers(1, 64), max_size=50))
def test_decoder_never_raises_and_stays_bounded(data, cuts):
    decoder = FrameDecoder()
    pos = 0
    for cut in [*cuts, len(data)]:
        decoder.feed(data[pos : pos + cut])
        pos += cut
    decoder.feed(data[pos:])
    assert len(decoder._buf) <= 2 + 7 + 512 + 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=200), frames_st), max_size=12),
    st.integers(1, 97),
)
def test_every_frame_survives_garbage_between_and_any_split(items, split):
    stream = b""
    for garbage, frame in items:
        stream += garbage + frame.encode()
    stream += bytes(600)  # lets any fake header inside the garbage run out and fail its CRC
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(0, len(stream), split):
        got += decoder.feed(stream[i : i + split])
    wanted = [f for _, f in items]
    # Garbage may contain a valid frame by chance only if it embeds one verbatim; the
    # real frames must all be there, in order.
    it = iter(got)
    assert all(any(g == w for g in it) for w in wanted), (wanted, got)


def test_crc_error_is_counted_and_the_next_frame_still_arrives():
    good = Frame(1, 7, b"\x01\x00").encode()
    bad = bytearray(Frame(1, 6, b"\x02\x00").encode())
    bad[-1] ^= 0xFF
    decoder = FrameDecoder()
    assert decoder.feed(bytes(bad) + b"\x00junk" + SOF + good) == [Frame(1, 7, b"\x01\x00")]
    assert decoder.stats.crc_errors == 1


ALL_EVENTS = [
    ButtonEvent(Button.RECORD, False),
    ButtonEvent(Button.MARK, True),
    BatteryEvent(17, 3650, False),
    DockEvent(True),
    GpsFix(
        39_125_000,
        117_200_000,
        True,
        "$GPGGA,092750.000,3907.5000,N,11712.0000,E,1,8,1.03,61.7,M,55.2,M,,*61",
    ),
    TamperEvent(True),
    TemperatureEvent(-1250),
    TemperatureEvent(None),  # the MCU has no reading
    StorageEvent(True, 30_000),
    DeviceInfo("SN-1", "fw-2.1"),
    CommandAck(3, True),
]


def test_events_round_trip():
    for event in ALL_EVENTS:
        ftype, payload = encode_event(event)
        parsed = parse_event(Frame(ftype, 0, payload))
        if isinstance(event, GpsFix):
            assert isinstance(parsed, GpsFix) and parsed.fix
            assert abs(parsed.lat_e6 - event.lat_e6) <= 1 and abs(parsed.lon_e6 - event.lon_e6) <= 1
        else:
            assert parsed == event


def test_a_temperature_the_mcu_cannot_read_is_no_reading_and_below_absolute_zero_is_refused():
    # -32768 is how an MCU says "no sensor": taken as a temperature it reached telemetry,
    # and the gateway refused every telemetry message of the device after it.
    import struct

    from agent.hardware import HardwareState
    from protocol.state import Telemetry

    missing = parse_event(Frame(FrameType.TEMPERATURE, 0, struct.pack(">h", -32768)))
    assert missing == TemperatureEvent(None)
    with pytest.raises(BadPayload, match="below absolute zero"):
        parse_event(Frame(FrameType.TEMPERATURE, 0, struct.pack(">h", -27316)))
    assert parse_event(Frame(FrameType.TEMPERATURE, 0, struct.pack(">h", -27315))) == (
        TemperatureEvent(-27315)
    )
    state = HardwareState(temperature_centi=missing.centi_celsius)
    sent = Telemetry("cam-1", 1, 0, 0, -1, 0, 0, 0, **dataclasses.asdict(state))
    assert Telemetry.decode(sent.encode()).temperature_centi is None


class Collector:
    def __init__(self) -> None:
        self.events: list[object] = []
        self.lock = threading.Lock()

    def __call__(self, event: object) -> None:
        with self.lock:
            self.events.append(event)


def test_link_over_a_real_pty_with_garbage_unplug_and_commands(tmp_path: Path):
    port = tmp_path / "ttyMCU"
    mcu = McuSimulator(port)
    got = Collector()
    link = SerialLink(str(port), got, backoff=(0.05, 0.5))
    link.start()
    try:
        wait_for(link.connected.is_set, 10, "link open")
        for event in ALL_EVENTS[:4]:
            mcu.send(event)
        wait_for(lambda: len(got.events) == 4, 10, "first events")
        assert got.events == ALL_EVENTS[:4]
        # Line noise, a frame with a broken CRC, then real frames again.
        mcu.send_raw(b"\x00\xff\xa5\x5a\x01garbage\xa5")
        broken = bytearray(Frame(0x03, 99, b"\x01").encode())
        broken[-2] ^= 0x55
        mcu.send_raw(bytes(broken))
        mcu.send(DockEvent(False))
        wait_for(lambda: DockEvent(False) in got.events, 10, "event after garbage")
        assert link.decoder_stats.crc_errors + link.decoder_stats.bad_headers >= 1
        assert link.decoder_stats.skipped_bytes > 0
        # Commands reach the MCU and come back acknowledged.
        seq = link.send(Led(color=1, blink_ms=250))
        assert not mcu.listening.is_set()  # a scenario would still be waiting to start
        link.send(GetInfo())
        wait_for(lambda: CommandAck(seq, True) in got.events, 10, "ack")
        wait_for(lambda: DeviceInfo("SIM-0001", "sim-1.0") in got.events, 10, "device info")
        assert [f.type for f in mcu.commands][:2] == [0x81, 0x84]
        assert mcu.listening.is_set()
        # The cable is pulled, then plugged back in.
        mcu.unplug()
        wait_for(lambda: not link.connected.is_set(), 10, "link notices the unplug")
        mcu.plug()
        wait_for(link.connected.is_set, 10, "link reconnects")
        mcu.send(TamperEvent(False))
        wait_for(lambda: TamperEvent(False) in got.events, 10, "event after replug")
        assert link.stats.disconnects >= 1 and link.stats.opened >= 2
    finally:
        link.stop()
        mcu.close()


def test_link_over_loop_url_counts_frames_it_cannot_use():
    got = Collector()
    link = SerialLink("loop://", got)
    link.start()
    try:
        wait_for(link.connected.is_set, 10, "loop open")
        link.send(Led(2, 0))  # loops back: a command is not an event, counted and ignored
        wait_for(lambda: link.stats.bad_payloads == 1, 10, "counted bad payload")
        assert got.events == []
    finally:
        link.stop()


@settings(max_examples=500, deadline=None)
@given(frames_st)
def test_parsing_any_frame_either_works_or_says_why(frame):
    from firmware_bridge.messages import BadPayload

    # Anything else than BadPayload escaping would fail the test.
    with contextlib.suppress(BadPayload):
        parse_event(frame)


def nmea(body: str) -> str:
    """A sentence with a correct checksum, whatever its fields say."""
    checksum = 0
    for ch in body.encode("ascii"):
        checksum ^= ch
    return f"${body}*{checksum:02X}"


def gga(lat: str, lat_dir: str = "N", lon: str = "01131.000", lon_dir: str = "E") -> str:
    return nmea(f"GPGGA,123519,{lat},{lat_dir},{lon},{lon_dir},1,08,0.9,545.4,M,46.9,M,,")


MALFORMED_GPS = [
    gga("48O7.038"),  # letter O for zero
    gga("-4807.038"),
    gga("48.07038"),  # decimal degrees, not degrees and minutes
    gga("nan"),
    gga("inf"),
    gga("4807.038", lon="-inf"),
    gga("1e400"),
    gga("4875.000"),  # 75 minutes
    gga("9130.000"),  # beyond the pole
    gga("4807.038", lon="18100.000"),
    gga("4807.038", lat_dir="X"),  # pynmea2 would call this latitude 0
    gga("", lat_dir=""),  # claims a fix, gives no position
    nmea("GPGGA,123519,4807.038,N,01131.000,E,X,08,0.9,545.4,M,46.9,M,,"),  # quality X
    nmea("GPRMC,123519,A,nan,N,01131.000,E,022.4,084.4,230394,003.1,W"),
]


def test_gps_with_a_malformed_coordinate_is_a_bad_payload():
    for sentence in MALFORMED_GPS:
        try:
            fix = parse_nmea(sentence.encode())
        except BadPayload:
            continue
        raise AssertionError(f"{sentence} parsed as {fix}")
    good = parse_nmea(gga("4807.038", "S", "01131.000", "W").encode())
    assert (good.lat_e6, good.lon_e6, good.fix) == (-48_117_300, -11_516_667, True)
    searching = nmea("GPGGA,123519,,,,,0,00,,,M,,M,,")
    assert parse_nmea(searching.encode()) == GpsFix(0, 0, False, searching)


nmea_field = st.text(alphabet="0123456789.-+eEinfaNSEWAVX ", max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(nmea_field, min_size=14, max_size=14), st.sampled_from(["GPGGA", "GPRMC"]))
def test_any_checksummed_nmea_either_parses_or_is_a_bad_payload(fields, talker):
    with contextlib.suppress(BadPayload):
        fix = parse_nmea(nmea(",".join([talker, *fields])).encode())
        assert -90_000_000 <= fix.lat_e6 <= 90_000_000
        assert -180_000_000 <= fix.lon_e6 <= 180_000_000


def test_malformed_gps_over_a_real_pty_is_counted_and_the_reader_goes_on(tmp_path: Path):
    port = tmp_path / "ttyMCU"
    mcu = McuSimulator(port)
    got = Collector()
    link = SerialLink(str(port), got, backoff=(0.05, 0.5))
    link.start()
    try:
        wait_for(link.connected.is_set, 10, "link open")
        link.send(GetInfo())  # pyserial flushes on open: wait until the link really reads
        wait_for(mcu.listening.is_set, 10, "MCU sees the agent listening")
        for i, sentence in enumerate(MALFORMED_GPS):
            mcu.send_frame(Frame(FrameType.GPS, 100 + i, sentence.encode()))
        after = [TamperEvent(True), ButtonEvent(Button.MARK, False), BatteryEvent(5, 3300, False)]
        for event in after:
            mcu.send(event)
        wait_for(lambda: all(e in got.events for e in after), 10, "events after bad GPS")
        assert link.stats.bad_payloads == len(MALFORMED_GPS)
        assert not any(isinstance(e, GpsFix) for e in got.events)
        assert link._thread is not None and link._thread.is_alive()
    finally:
        link.stop()
        mcu.close()


def test_a_frame_the_parser_chokes_on_never_ends_the_reader(tmp_path: Path, monkeypatch):
    # No real frame makes parse_event raise anything but BadPayload any more, so a parser
    # bug is simulated: the last-resort guard is what is under test.
    real_parse = link_module.parse_event

    def buggy_parse(frame: Frame):
        if frame.type == FrameType.TEMPERATURE:
            raise ZeroDivisionError("parser bug")
        return real_parse(frame)

    monkeypatch.setattr(link_module, "parse_event", buggy_parse)
    port = tmp_path / "ttyMCU"
    mcu = McuSimulator(port)
    got = Collector()
    link = SerialLink(str(port), got, backoff=(0.05, 0.5))
    link.start()
    try:
        wait_for(link.connected.is_set, 10, "link open")
        link.send(GetInfo())
        wait_for(mcu.listening.is_set, 10, "MCU sees the agent listening")
        mcu.send(TemperatureEvent(2500))
        mcu.send(TamperEvent(True))
        wait_for(lambda: TamperEvent(True) in got.events, 10, "event after the parser bug")
        assert link.stats.bad_payloads == 1
    finally:
        link.stop()
        mcu.close()


def test_a_port_that_cannot_be_opened_is_a_rate_limited_warning(tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG, logger="custody.firmware_bridge")
    port = tmp_path / "ttyMISSING"
    link = SerialLink(str(port), Collector(), backoff=(0.01, 0.02))

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "custody.firmware_bridge" and r.levelno == logging.WARNING
        ]

    link.start()
    mcu: McuSimulator | None = None
    try:
        wait_for(lambda: link.stats.open_failures >= 5, 10, "repeated open failures")
        assert len(warnings()) == 1, warnings()  # once, not once per retry
        assert f"MCU serial port {port} cannot be opened" in warnings()[0]
        assert "No such file or directory" in warnings()[0] and "(retrying)" in warnings()[0]
        # A different reason is news: a plain file where the tty should be.
        port.write_text("not a tty")
        wait_for(lambda: len(warnings()) == 2, 10, "warning for the new reason")
        assert str(port) in warnings()[1] and "No such file" not in warnings()[1]
        failures = link.stats.open_failures
        wait_for(lambda: link.stats.open_failures >= failures + 5, 10, "more failures")
        assert len(warnings()) == 2
        mcu = McuSimulator(port)
        wait_for(link.connected.is_set, 10, "link opens once the port is there")
    finally:
        link.stop()
        if mcu is not None:
            mcu.close()


def test_open_warning_repeats_after_the_interval(tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="custody.firmware_bridge")
    port = tmp_path / "ttyMISSING"
    link = SerialLink(str(port), Collector(), backoff=(0.01, 0.02), open_warning_every=0.2)
    link.start()
    try:
        wait_for(
            lambda: sum("cannot be opened" in r.getMessage() for r in caplog.records) >= 2,
            10,
            "a repeated warning after the interval",
        )
    finally:
        link.stop()
