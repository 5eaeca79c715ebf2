"""The RFC 5798 state machine, driven with a clock the test holds."""

from __future__ import annotations

import ipaddress

import pytest
from virtualinux.bootsvc.vrrp_state import Config, Router, Send, State, Transition
from virtualinux.bootsvc.vrrp_wire import Advertisement

PRIMARY = ipaddress.IPv4Address("198.18.0.11")
BACKUP = ipaddress.IPv4Address("198.18.0.12")
VIP = ipaddress.IPv4Address("198.18.0.254")


def router(priority: int = 100, address=BACKUP, interval: int = 100, **kw) -> Router:
    return Router(Config(vrid=51, priority=priority, interval=interval, address=address,
                         addresses=(VIP,), **kw))


def master(priority: int = 100, address=BACKUP, **kw) -> Router:
    """A router that started alone and became master when its master-down timer ran out."""
    r = router(priority=priority, address=address, **kw)
    r.start(0.0)
    r.tick(r.deadline())
    assert r.state is State.MASTER
    return r


def advert(priority: int, source=PRIMARY, interval: int = 100) -> Advertisement:
    return Advertisement(vrid=51, priority=priority, interval=interval, addresses=(VIP,),
                         source=source)


def sent(actions) -> list[int]:
    return [a.advert.priority for a in actions if isinstance(a, Send)]


def transitions(actions) -> list[tuple[State, State]]:
    return [(a.old, a.new) for a in actions if isinstance(a, Transition)]


def test_skew_and_master_down_interval_follow_the_rfc():
    r = router(priority=100, interval=100)
    assert r.skew_time() == pytest.approx((256 - 100) * 100 / 256 / 100)
    assert r.master_down_interval() == pytest.approx(3.0 + 0.609375)
    fast = router(priority=200, interval=10)
    assert fast.master_down_interval() == pytest.approx(0.3 + 56 * 10 / 256 / 100)


def test_starts_as_backup_and_becomes_master_after_master_down_interval():
    r = router()
    assert transitions(r.start(0.0)) == [(State.INITIALIZE, State.BACKUP)]
    assert r.deadline() == pytest.approx(r.master_down_interval())
    assert r.tick(3.0) == []
    actions = r.tick(r.deadline())
    assert transitions(actions) == [(State.BACKUP, State.MASTER)]
    assert sent(actions) == [100]
    assert r.master_address == BACKUP


def test_owner_starts_as_master():
    r = router(priority=255)
    actions = r.start(0.0)
    assert transitions(actions) == [(State.INITIALIZE, State.MASTER)] and sent(actions) == [255]


def test_master_advertises_every_interval():
    r = router(interval=10)
    r.start(0.0)
    r.tick(r.deadline())
    start = r.deadline()
    assert sent(r.tick(start)) == [100]
    assert r.deadline() == pytest.approx(start + 0.1)
    assert r.tick(start + 0.05) == []


def test_backup_follows_a_higher_master_and_learns_its_interval():
    r = router(priority=100)
    r.start(0.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        assert r.receive(advert(200, interval=50), t) == []
        assert r.tick(t + 0.5) == []
    assert r.state is State.BACKUP and r.master_address == PRIMARY
    assert r.master_adver_interval == 50
    assert r.deadline() == pytest.approx(5.0 + 1.5 + (256 - 100) * 50 / 256 / 100)


def test_priority_zero_makes_the_backup_take_over_after_its_skew():
    r = router(priority=100)
    r.start(0.0)
    r.receive(advert(200), 1.0)
    r.receive(advert(0), 1.5)
    assert r.deadline() == pytest.approx(1.5 + r.skew_time())
    actions = r.tick(r.deadline())
    assert transitions(actions) == [(State.BACKUP, State.MASTER)]
    assert actions[-1].reason == f"master {PRIMARY} stepped down (priority 0)"


def test_shutdown_of_a_master_sends_priority_zero():
    r = router()
    r.start(0.0)
    r.tick(r.deadline())
    actions = r.shutdown(10.0)
    assert sent(actions) == [0]
    assert transitions(actions) == [(State.MASTER, State.INITIALIZE)]
    assert r.deadline() is None


def test_master_steps_down_for_higher_priority_and_says_why():
    r = router(priority=100)
    r.start(0.0)
    r.tick(r.deadline())
    actions = r.receive(advert(200), 5.0)
    assert transitions(actions) == [(State.MASTER, State.BACKUP)]
    assert actions[0].reason == f"higher priority 200 from {PRIMARY}"
    assert r.master_address == PRIMARY


def test_master_ignores_lower_priority():
    r = master(priority=200, address=PRIMARY)
    assert r.receive(advert(100, source=BACKUP), 5.0) == []
    assert r.state is State.MASTER


def test_equal_priority_higher_address_wins():
    low = master(priority=100, address=PRIMARY)
    high = master(priority=100, address=BACKUP)
    assert transitions(low.receive(advert(100, source=BACKUP), 5.0)) == [
        (State.MASTER, State.BACKUP)]
    assert high.receive(advert(100, source=PRIMARY), 5.0) == []
    assert high.state is State.MASTER


def test_backup_preempts_a_lower_master():
    r = router(priority=200, address=PRIMARY)
    r.start(0.0)
    r.receive(advert(100, source=BACKUP), 0.5)   # discarded: never resets the timer
    r.receive(advert(100, source=BACKUP), 1.5)
    assert r.deadline() == pytest.approx(r.master_down_interval())
    assert transitions(r.tick(r.deadline())) == [(State.BACKUP, State.MASTER)]


def test_preempt_off_keeps_a_lower_master():
    r = router(priority=200, address=PRIMARY, preempt=False)
    r.start(0.0)
    for t in range(1, 20):
        r.receive(advert(100, source=BACKUP), float(t))
        assert r.tick(t + 0.5) == []
    assert r.state is State.BACKUP and r.master_address == BACKUP


def test_preempt_delay_holds_off_preemption_for_that_long():
    r = router(priority=200, address=PRIMARY, preempt_delay=10.0)
    r.start(0.0)
    t = 0.0
    while t < 10.0:
        r.receive(advert(100, source=BACKUP), t)
        assert r.tick(t + 0.9) == [], t
        t += 1.0
    r.receive(advert(100, source=BACKUP), 10.0)   # the delay is over: discarded
    deadline = r.deadline()
    assert deadline == pytest.approx(9.0 + r.master_down_interval())
    assert transitions(r.tick(deadline)) == [(State.BACKUP, State.MASTER)]


def test_split_brain_heals_to_one_master_within_one_interval():
    a = master(priority=200, address=PRIMARY)
    b = master(priority=100, address=BACKUP)          # the partition: two masters
    # The link heals at t=20: each hears the other's next advertisement.
    now = 20.0
    for _ in range(3):
        for me, peer in ((a, b), (b, a)):
            if me.state is State.MASTER and me.deadline() <= now + 1.0:
                for action in me.tick(me.deadline()):
                    if isinstance(action, Send):
                        peer.receive(action.advert, me.deadline() or now)
        now += 1.0
    assert (a.state, b.state) == (State.MASTER, State.BACKUP)


def test_lower_priority_on_a_master_is_announced_at_once_and_the_backup_takes_over():
    a = router(priority=200, address=PRIMARY)
    b = router(priority=100, address=BACKUP)
    a.start(0.0)
    a.tick(a.deadline())
    b.start(0.0)
    b.receive(a.advert(), 3.0)
    actions = a.set_priority(50, 3.2)                  # tracked uplink lost
    assert sent(actions) == [50]
    b.receive(actions[0].advert, 3.2)                  # discarded by a preempting backup
    assert transitions(b.tick(b.deadline())) == [(State.BACKUP, State.MASTER)]
    assert transitions(a.receive(b.advert(), b.deadline())) == [(State.MASTER, State.BACKUP)]


def test_other_vrids_are_ignored():
    r = router()
    r.start(0.0)
    other = Advertisement(vrid=52, priority=250, interval=100, addresses=(VIP,),
                          source=PRIMARY)
    r.receive(other, 1.0)
    assert r.master_address is None
    assert transitions(r.tick(r.deadline())) == [(State.BACKUP, State.MASTER)]


def test_reconfigure_keeps_state_and_tracked_penalty():
    r = router(priority=200, address=PRIMARY)
    r.start(0.0)
    r.tick(r.deadline())
    r.set_priority(50, 4.0)
    new = Config(vrid=51, priority=220, interval=50, address=PRIMARY, addresses=(VIP,))
    actions = r.reconfigure(new, 5.0)
    assert r.state is State.MASTER and r.priority == 70
    assert sent(actions) == [70] and actions[0].advert.interval == 50
