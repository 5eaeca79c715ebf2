"""The VRRPv3 state machine of RFC 5798 section 6.4, as pure logic with the clock passed in.

A `Router` knows nothing of sockets, addresses on interfaces or time: every call takes `now`
(seconds on any monotonic clock) and returns what to do as a list of actions, `Send` (an
advertisement to multicast) and `Transition` (the state changed, with the reason in words for
the log). `deadline()` says when `tick(now)` must be called next. So tests drive it with a
clock they hold, and the service (bootsvc.heartbeat) drives it with the event loop's.

Beyond the RFC: a preempt delay (keepalived's `preempt_delay`): a backup of higher priority
lets a master of lower priority keep the address for that long after it first hears it, so a
primary that has just booted can settle first. Imports only `vrrp_wire`'s values.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress

from .vrrp_wire import PRIORITY_OWNER, PRIORITY_SHUTDOWN, Advertisement

CENTI = 100.0


class State(enum.Enum):
    INITIALIZE = "initialize"
    BACKUP = "backup"
    MASTER = "master"


@dataclasses.dataclass(frozen=True)
class Config:
    vrid: int
    priority: int                               # 1-254, or 255 for the address owner
    interval: int                               # Advertisement_Interval, centiseconds
    address: ipaddress.IPv4Address              # our primary address: ties and the log
    addresses: tuple[ipaddress.IPv4Address, ...]  # the virtual addresses
    preempt: bool = True
    preempt_delay: float = 0.0                  # seconds


@dataclasses.dataclass(frozen=True)
class Send:
    advert: Advertisement


@dataclasses.dataclass(frozen=True)
class Transition:
    old: State
    new: State
    reason: str


Action = Send | Transition


class Router:
    def __init__(self, config: Config):
        self.config = config
        self.priority = config.priority          # lowered while a tracked link is down
        self.state = State.INITIALIZE
        self.master_address: ipaddress.IPv4Address | None = None
        self.master_adver_interval = config.interval
        self.master_down_at: float | None = None
        self.adver_at: float | None = None
        self._lower_master_since: float | None = None
        self._stepped_down: ipaddress.IPv4Address | None = None   # sent priority 0

    # RFC 5798 6.1, in seconds; Master_Adver_Interval is what the master announces.
    def skew_time(self) -> float:
        return (256 - self.priority) * self.master_adver_interval / 256 / CENTI

    def master_down_interval(self) -> float:
        return 3 * self.master_adver_interval / CENTI + self.skew_time()

    def deadline(self) -> float | None:
        if self.state is State.BACKUP:
            return self.master_down_at
        if self.state is State.MASTER:
            return self.adver_at
        return None

    def advert(self, priority: int | None = None) -> Advertisement:
        return Advertisement(vrid=self.config.vrid,
                             priority=self.priority if priority is None else priority,
                             interval=self.config.interval, addresses=self.config.addresses,
                             source=self.config.address)

    def start(self, now: float) -> list[Action]:
        if self.state is not State.INITIALIZE:
            return []
        if self.priority == PRIORITY_OWNER:
            return self._become_master(now, "owner of the address")
        return self._become_backup(now, self.config.interval, None, "start")

    def shutdown(self, now: float) -> list[Action]:
        """Leave the group; a master says so with priority 0 so a backup takes over at once."""
        actions: list[Action] = []
        if self.state is State.MASTER:
            actions.append(Send(self.advert(PRIORITY_SHUTDOWN)))
        if self.state is not State.INITIALIZE:
            actions.append(Transition(self.state, State.INITIALIZE, "shutdown"))
        self.state = State.INITIALIZE
        self.master_down_at = self.adver_at = None
        self.master_address = None
        return actions

    def tick(self, now: float) -> list[Action]:
        if self.state is State.BACKUP and self.master_down_at is not None \
                and now >= self.master_down_at:
            if self._stepped_down is not None:
                why = f"master {self._stepped_down} stepped down (priority 0)"
            else:
                why = f"no advertisement for {self.master_down_interval():.2f} s"
            return self._become_master(now, why)
        if self.state is State.MASTER and self.adver_at is not None and now >= self.adver_at:
            self.adver_at = now + self.config.interval / CENTI
            return [Send(self.advert())]
        return []

    def receive(self, advert: Advertisement, now: float) -> list[Action]:
        """An advertisement of our VRID that passed the wire checks."""
        if advert.vrid != self.config.vrid:
            return []
        if self.state is State.BACKUP:
            return self._backup_receives(advert, now)
        if self.state is State.MASTER:
            return self._master_receives(advert, now)
        return []

    def set_priority(self, priority: int, now: float) -> list[Action]:
        """A new local priority (a tracked link went down or up). A master announces it at
        once, so a backup that now outranks it can take over without waiting for a timer."""
        if priority == self.priority:
            return []
        self.priority = priority
        if self.state is State.MASTER:
            self.adver_at = now + self.config.interval / CENTI
            return [Send(self.advert())]
        return []

    def reconfigure(self, config: Config, now: float) -> list[Action]:
        """New settings from a newer database generation; the state is kept."""
        lowered = self.config.priority - self.priority
        self.config = config
        actions = self.set_priority(max(1, config.priority - lowered), now)
        if self.state is State.MASTER and not actions:
            # Announce new addresses or interval now rather than at the next timer.
            self.adver_at = now + config.interval / CENTI
            actions.append(Send(self.advert()))
        return actions

    def _backup_receives(self, advert: Advertisement, now: float) -> list[Action]:
        if advert.priority == PRIORITY_SHUTDOWN:
            # The master stepped down: wait only our skew, so the highest backup goes first.
            self.master_down_at = now + self.skew_time()
            self.master_address = None
            self._stepped_down = advert.source
            return []
        if advert.priority < self.priority and self.config.preempt:
            if self._lower_master_since is None:
                self._lower_master_since = now
            if now >= self._lower_master_since + self.config.preempt_delay:
                return []   # discarded: the master-down timer runs out and we preempt
        else:
            self._lower_master_since = None
        self._stepped_down = None
        self.master_address = advert.source
        self.master_adver_interval = advert.interval
        self.master_down_at = now + self.master_down_interval()
        return []

    def _master_receives(self, advert: Advertisement, now: float) -> list[Action]:
        if advert.priority == PRIORITY_SHUTDOWN:
            self.adver_at = now + self.config.interval / CENTI
            return [Send(self.advert())]
        if advert.priority > self.priority:
            why = f"higher priority {advert.priority} from {advert.source}"
        elif advert.priority == self.priority and advert.source > self.config.address:
            why = f"equal priority {advert.priority} from higher address {advert.source}"
        else:
            return []
        return self._become_backup(now, advert.interval, advert.source, why)

    def _become_master(self, now: float, reason: str) -> list[Action]:
        old, self.state = self.state, State.MASTER
        self.master_down_at = None
        self.master_address = self.config.address
        self._lower_master_since = None
        self._stepped_down = None
        self.adver_at = now + self.config.interval / CENTI
        return [Send(self.advert()), Transition(old, State.MASTER, reason)]

    def _become_backup(self, now: float, interval: int,
                       master: ipaddress.IPv4Address | None, reason: str) -> list[Action]:
        old, self.state = self.state, State.BACKUP
        self.adver_at = None
        self.master_address = master
        self.master_adver_interval = interval
        self.master_down_at = now + self.master_down_interval()
        self._lower_master_since = None
        return [Transition(old, State.BACKUP, reason)]
