"""The shared rule for recurring warnings (agent transport, gateway service, firmware link)."""

from protocol.throttle import Throttle


def test_first_time_on_change_and_once_per_interval() -> None:
    t = Throttle(every=60.0)
    assert not t.active
    assert t.due("refused", 0.0) and t.active
    assert not t.due("refused", 5.0) and not t.due("refused", 59.9)
    assert t.due("certificate verify failed", 60.0)  # another reason is news at once
    assert not t.due("certificate verify failed", 100.0)
    assert t.due("certificate verify failed", 120.0)  # a minute since it was last said
    t.reset()
    assert not t.active and t.due("certificate verify failed", 121.0)
