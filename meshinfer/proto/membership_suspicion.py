"""Lifeguard: suspicion timers that shrink with confirmations, and local health awareness.

:class:`SuspicionTimer` -- when a member is suspected the timer starts at ``max_timeout`` and,
as ``k`` independent members confirm the suspicion, shrinks towards ``min_timeout``::

    timeout(C) = max(min, max - (max - min) * log(C + 1) / log(k + 1))

so a crash that many members see is declared quickly, while a suspicion raised by one node with
a bad link (that nobody confirms) has the longest time to be refuted.

:class:`LocalHealth` -- the Lifeguard "local health multiplier": a node that misses acks *and*
the nacks its relays should have sent, or that has to refute suspicions about itself, is
probably the slow one. Its score (0..max-1) scales its own probe interval and probe timeout by
``score + 1``; every successful probe lowers it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class SuspicionTimer:
    """Deadline of one suspicion, shortened by each new independent accuser."""

    started: float
    min_timeout: float
    max_timeout: float
    k: int  # confirmations that bring the timeout down to min_timeout
    accusers: set[str] = field(default_factory=set)
    #: When the suspected member is to be declared dead (updated by :meth:`confirm`).
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = self.started + self.timeout()

    @property
    def confirmations(self) -> int:
        """Independent confirmations counted so far (the first accuser does not count)."""
        return max(0, len(self.accusers) - 1)

    def timeout(self) -> float:
        """The current timeout, by the Lifeguard formula."""
        if self.k < 1:
            return self.min_timeout
        shrink = math.log(self.confirmations + 1) / math.log(self.k + 1)
        return max(
            self.min_timeout, self.max_timeout - (self.max_timeout - self.min_timeout) * shrink
        )

    def confirm(self, accuser: str) -> bool:
        """Count ``accuser``; True when it is new (and within the k that still matter)."""
        if accuser in self.accusers or self.confirmations >= self.k:
            return False
        self.accusers.add(accuser)
        self.deadline = self.started + self.timeout()
        return True


class LocalHealth:
    """Lifeguard local health multiplier: a score in ``0 .. max_multiplier - 1``."""

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        """Raise (missed nacks, refutations) or lower (successful probes) the score."""
        self.score = min(self._max - 1, max(0, self.score + delta))

    def scale(self, duration: float) -> float:
        """``duration * (score + 1)``: how much longer to wait while we are unhealthy."""
        return duration * (self.score + 1)
