"""Combining the outputs of several sources (models or nodes) into one task result. Sans-I/O.

An :class:`Aggregator` is built for a known set of expected sources and fed with
``add(source, array, now)`` (an output) or ``add_failure(source, now)`` (that source will never
answer). ``is_done(now)`` says when the result is ready; ``result()`` returns it. Time comes in
as ``now`` (any monotonic clock, the caller's) and ``deadline()`` says when the caller should
call ``is_done`` again at the latest.

Modes (:class:`Mode`):

* ``first``    -- the first output that arrives.
* ``all``      -- every output, as a tuple ordered by source id; done when every source answered.
* ``majority`` -- a vote: each output's class predictions (``argmax`` over the last axis of a
  float output, which must hold a score; an integer output already holds labels, which must
  fit int64), element-wise
  majority; ties go to the smallest label and are reported (``tied``). A float output whose
  scores for an element hold a NaN *abstains* there: it counts for no label (and is no vote
  still outstanding either: its source answered). An element on which every source that
  answered abstained has no winner: the value holds -1 there and the result lists it
  (``abstained``; an integer label -1 is told apart by that list). Done when every source
  answered, or early when no outstanding vote could change any element's winner. Each output
  is voted once, as it arrives, into running counts (:class:`_RunningVote`).
* ``weighted`` -- the weighted average ``sum(w_s x_s) / sum(w_s)`` of float outputs, with
  per-source weights (default 1); done when every source answered. Summed in float64 (so
  that outputs near its limit, whose plain sum would overflow, are summed scaled down), it has
  the outputs' float dtype (float64 for integer outputs). A NaN output gives a NaN average.
* ``ensemble`` -- the weighted average over a *quorum*: done once ``quorum`` outputs arrived,
  whatever the other sources do.

Lifecycle: ``collecting`` -> ``done``, entered exactly once, for one of three reasons
(:attr:`AggregateResult.reason`): ``complete`` (the mode's own rule), ``timeout`` (``now`` reached
the deadline) or ``exhausted`` (every source answered or failed, and failures kept the rule
from being met). Done by timeout or exhausted, the result is *partial* if at least
``min_responses`` outputs arrived and *failed* otherwise. Once done, further outputs are ignored
and counted as late; a second output from the same source is ignored and counted as a
duplicate; outputs from unexpected sources are counted and ignored. Sums run in source-id order,
so the value does not depend on arrival order (``first`` aside; and a ``majority`` decided early
lists only the sources that had voted by then).
"""

from __future__ import annotations

import enum
import functools
import math
import numbers
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from meshinfer.errors import ConfigError, LocalProtocolError, RemoteProtocolError

__all__ = ["AggregateResult", "AggregationConfig", "Aggregator", "Mode", "majority_vote"]


class Mode(enum.StrEnum):
    """How outputs are combined (module docstring)."""

    FIRST = "first"
    ALL = "all"
    MAJORITY = "majority"
    WEIGHTED = "weighted"
    ENSEMBLE = "ensemble"


@dataclass(frozen=True, slots=True)
class AggregationConfig:
    """How to aggregate. ``timeout_s`` (positive) counts from the aggregator's start (None: no
    timeout); ``quorum`` (ensemble only) defaults to every expected source; at the timeout, or when
    every source answered but failures kept the mode's rule from being met, at least
    ``min_responses`` outputs give a partial result, fewer a failed one. ``weights``: per-source
    weight for weighted/ensemble (default 1, must be positive and finite; a source not
    expected is refused)."""

    mode: Mode = Mode.ALL
    quorum: int | None = None
    min_responses: int = 1
    timeout_s: float | None = None
    weights: Mapping[str, float] = field(default_factory=dict, hash=False)

    def check(self, expected: int) -> None:
        """Raise ConfigError (naming the field) if unusable with ``expected`` sources, or of
        the wrong type (a quorum of 1.5 acted as 2; a weight ``"2"`` raised a TypeError)."""
        _check_types(self)
        if expected < 1:
            raise ConfigError("aggregation: at least one expected source is needed")
        if self.quorum is not None and not 1 <= self.quorum <= expected:
            raise ConfigError(f"aggregation.quorum {self.quorum} outside 1..{expected}")
        if not 1 <= self.min_responses <= expected:
            raise ConfigError(
                f"aggregation.min_responses {self.min_responses} outside 1..{expected}"
            )
        if self.timeout_s is not None and not 0 < self.timeout_s < math.inf:
            # (0 would time the aggregation out as it starts, with no output in)
            raise ConfigError(f"aggregation.timeout_s {self.timeout_s} must be finite and > 0")
        if any(not 0 < w < math.inf for w in self.weights.values()):
            raise ConfigError("aggregation.weights must be positive and finite")


def _check_types(config: AggregationConfig) -> None:
    def integer(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def real(value: object) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    if config.mode not in {mode.value for mode in Mode}:  # (a str of one is taken)
        raise ConfigError(
            f"aggregation.mode {config.mode!r} is not one of {[str(m) for m in Mode]}"
        )
    if not (config.quorum is None or integer(config.quorum)):
        raise ConfigError(f"aggregation.quorum {config.quorum!r} must be an integer")
    if not integer(config.min_responses):
        raise ConfigError(f"aggregation.min_responses {config.min_responses!r} must be an integer")
    if not (config.timeout_s is None or real(config.timeout_s)):
        raise ConfigError(f"aggregation.timeout_s {config.timeout_s!r} must be a number")
    if not isinstance(config.weights, Mapping) or not all(map(real, config.weights.values())):
        raise ConfigError("aggregation.weights must map sources to numbers")


@dataclass(frozen=True, slots=True)
class AggregateResult:
    """The outcome. ``value``: an array (a tuple of arrays for ``all``; None when failed).
    ``sources``: who contributed, sorted. ``tied``: for ``majority``, the flat indices of
    elements whose vote was tied (each resolved to the smallest label); ``abstained``: those
    on which every source abstained (NaN scores: no winner, -1 in ``value``)."""

    mode: Mode
    value: np.ndarray | tuple[np.ndarray, ...] | None
    sources: tuple[str, ...]
    partial: bool
    failed: bool
    reason: str  # "complete", "timeout" or "exhausted"
    tied: tuple[int, ...] = ()
    duplicates: int = 0
    late: int = 0
    abstained: tuple[int, ...] = ()


def _average_dtype(outputs) -> np.dtype:
    """The dtype of a weighted average: the outputs' own float dtype (float32 models give a
    float32 average; mixed ones the wider), float64 when any output holds integers. The sums
    run in float64 either way; an average lies between its inputs, so narrowing it back to
    their dtype never overflows."""
    dtypes = [a.dtype for a in outputs]
    if all(d.kind == "f" for d in dtypes):
        return np.result_type(*dtypes)
    return np.dtype(np.float64)


def _votes(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Class labels of one output, and where it abstains: argmax over the last axis of floats
    (abstaining, True, on an element whose scores hold a NaN), integers as they are (they
    never abstain: None)."""
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim == 0 or array.shape[-1] == 0:  # (argmax of no scores has no answer)
            raise RemoteProtocolError(
                f"majority: a float output needs a class axis of 1 or more scores, "
                f"got shape {list(array.shape)}"
            )
        return np.argmax(array, axis=-1), np.isnan(array).any(axis=-1)
    return array.astype(np.int64), None


def _check_labels(array: np.ndarray) -> None:
    """Integer labels must fit int64, as votes are counted (a uint64 label past it would
    wrap round to a negative one): RemoteProtocolError otherwise."""
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise RemoteProtocolError(f"majority: label {int(array.max())} does not fit int64")


def _tally(votes: np.ndarray, abstain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per element: its ``k`` labels sorted, and how often each of them occurs in the element
    (0 for an abstention: ``abstain``, of the votes' shape, True where a voter abstains).

    Equal labels are neighbours once sorted, so each label's count is the length of its run:
    memory is linear in elements x k (comparing every pair of voters was elements x k x k).
    Abstentions sort after the votes, in runs of their own.
    """
    flat = votes.reshape(votes.shape[0], -1).T  # (elements, k)
    if abstain is None:
        ranked, skipped = np.sort(flat, axis=1), None
    else:
        skips = abstain.reshape(flat.shape[::-1]).T
        order = np.lexsort((flat, skips), axis=1)  # by abstention, then by label
        ranked = np.take_along_axis(flat, order, axis=1)
        skipped = np.take_along_axis(skips, order, axis=1)
    elements, k = ranked.shape
    starts = np.ones(ranked.shape, dtype=bool)
    starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    if skipped is not None:
        starts[:, 1:] |= skipped[:, 1:] != skipped[:, :-1]
    runs = np.cumsum(starts, axis=1) - 1 + (np.arange(elements) * k)[:, None]  # run ids, global
    counts = np.bincount(runs.ravel(), minlength=elements * k)[runs]
    if skipped is not None:
        counts[skipped] = 0
    return ranked, counts


def majority_vote(
    votes: np.ndarray, abstain: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise vote over ``votes`` of shape ``(k, *S)`` (k voters, integer labels);
    ``abstain`` (same shape, optional) is True where a voter casts no vote.

    Returns ``(winner, tied)`` of shape ``S``: the most frequent label (a tie goes to the
    smallest label; -1 where every voter abstained) and whether the element was tied.
    """
    ranked, counts = _tally(votes, abstain)
    best = counts.max(axis=1)
    winner = ranked[np.arange(len(ranked)), counts.argmax(axis=1)]  # first max: smallest label
    tied = (counts == best[:, None]).sum(axis=1) > best
    if abstain is not None:
        winner, tied = np.where(best > 0, winner, -1), tied & (best > 0)
    shape = votes.shape[1:]
    return winner.reshape(shape), tied.reshape(shape)


class _RunningVote:
    """The running counts of a ``majority`` vote, each voter's labels added once as its output
    arrives (the argmax of that output alone; no earlier output is looked at again).

    Per element, up to ``voters`` slots of (label, count), filled left to right as labels first
    appear there (an abstention takes none): each slot holds a distinct label, so the winner is
    the smallest label among the slots with the most votes, and the best count of any other
    label is the second largest count. Adding a voter costs elements x voters integer
    comparisons; memory is linear in elements x voters, whatever the labels."""

    def __init__(self, shape: tuple[int, ...], voters: int):
        elements = math.prod(shape)
        self._shape = shape
        self._labels = np.zeros((elements, voters), np.int64)
        self._counts = np.zeros((elements, voters), np.int64)
        self._distinct = np.zeros(elements, np.intp)  # slots filled, per element

    def add(self, votes: np.ndarray, abstain: np.ndarray | None) -> None:
        """Count one voter's ``votes`` (labels of the vote's shape; ``abstain`` True where it
        casts none)."""
        labels = votes.reshape(-1)
        voting = np.ones(labels.shape, bool) if abstain is None else ~abstain.reshape(-1)
        hit = (self._labels == labels[:, None]) & (self._counts > 0)  # its label's slot, if any
        self._counts[hit & voting[:, None]] += 1
        rows = np.flatnonzero(voting & ~hit.any(axis=1))  # a label new to the element
        slots = self._distinct[rows]
        self._labels[rows, slots] = labels[rows]
        self._counts[rows, slots] = 1
        self._distinct[rows] += 1

    def margin(self) -> int:
        """The least lead, over the elements, of the winner's count over any other label's
        (abstentions count for none); 0 for a vote over no elements (an empty output: nothing
        to decide early, so every vote is waited for)."""
        counts = self._counts
        if not counts.size:
            return 0
        best = counts.max(axis=1)
        if counts.shape[1] < 2:
            return int(best.min())
        runner_up = np.partition(counts, -2, axis=1)[:, -2]
        return int((best - runner_up).min())

    def outcome(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(winner, tied, abstained)`` as :func:`majority_vote` gives them over the voters
        counted, and whether every voter abstained on an element: each of the vote's shape."""
        counts = self._counts
        best = counts.max(axis=1)
        top = (counts == best[:, None]) & (counts > 0)
        smallest = np.where(top, self._labels, np.iinfo(np.int64).max).min(axis=1)
        winner = np.where(best > 0, smallest, -1)
        tied = top.sum(axis=1) > 1
        shape = self._shape
        return winner.reshape(shape), tied.reshape(shape), (best == 0).reshape(shape)


class Aggregator:
    """Collects outputs from ``expected`` sources under ``config`` (module docstring)."""

    def __init__(self, config: AggregationConfig, expected: Collection[str], *, now: float):
        self.config = config
        self.expected = frozenset(expected)
        config.check(len(self.expected))
        strangers = sorted(set(config.weights) - self.expected)
        if strangers:  # a typo would silently weigh that source 1
            raise ConfigError(f"aggregation.weights names {strangers[0]!r}, not a source here")
        self._outputs: dict[str, np.ndarray] = {}
        self._order: list[str] = []
        self._shape: tuple[int, ...] | None = None  # every output's (majority: vote's) shape
        self._vote: _RunningVote | None = None  # majority: the votes counted so far
        self._margin = 0  # majority: the least lead of a winner (_RunningVote.margin)
        self._failed: set[str] = set()
        self._deadline = None if config.timeout_s is None else now + config.timeout_s
        self._reason: str | None = None
        self.duplicates = 0
        self.late = 0
        self.unexpected = 0

    def deadline(self) -> float | None:
        """When the aggregator times out (None: never, or already done)."""
        return None if self._reason is not None else self._deadline

    def add(self, source_id: str, array: np.ndarray, now: float) -> None:
        """Record ``source_id``'s output. RemoteProtocolError (nothing recorded) when its shape
        or dtype does not fit the outputs already in."""
        if not self._accepts(source_id, now):
            return
        array = np.asarray(array)
        ballot = self._check_fits(array)
        self._outputs[source_id] = array
        self._order.append(source_id)
        if ballot is not None:
            self._count_vote(*ballot)
        self.is_done(now)

    def add_failure(self, source_id: str, now: float) -> None:
        """Record that ``source_id`` will never produce an output."""
        if self._accepts(source_id, now):
            self._failed.add(source_id)
            self.is_done(now)

    def _accepts(self, source_id: str, now: float) -> bool:
        if self.is_done(now):
            self.late += 1
            return False
        if source_id not in self.expected:
            self.unexpected += 1
            return False
        if source_id in self._outputs or source_id in self._failed:
            self.duplicates += 1
            return False
        return True

    def _check_fits(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | None:
        """RemoteProtocolError unless ``array`` fits the outputs already in; for ``majority``,
        its labels and abstentions (:func:`_votes`), else None."""
        mode, ballot = self.config.mode, None
        if mode in (Mode.WEIGHTED, Mode.ENSEMBLE, Mode.MAJORITY) and array.dtype.kind not in "biuf":
            raise RemoteProtocolError(f"{mode}: output dtype {array.dtype} is not numeric")
        if mode == Mode.MAJORITY:
            _check_labels(array)
            ballot = _votes(array)
            shape = ballot[0].shape
        else:
            shape = array.shape
        if mode != Mode.ALL and self._shape is not None and shape != self._shape:
            raise RemoteProtocolError(f"{mode}: output shape {shape} differs from {self._shape}")
        if self._shape is None:
            self._shape = shape
        return ballot

    def _count_vote(self, votes: np.ndarray, abstain: np.ndarray | None) -> None:
        if self._vote is None:
            self._vote = _RunningVote(votes.shape, len(self.expected))
        self._vote.add(votes, abstain)
        self._margin = self._vote.margin()

    def is_done(self, now: float) -> bool:
        """Whether the result is ready; closes the aggregator at the deadline."""
        if self._reason is None:
            self._reason = self._why_done(now)
        return self._reason is not None

    def _why_done(self, now: float) -> str | None:
        if self._complete():
            return "complete"
        if self._exhausted():
            return "exhausted"
        if self._deadline is not None and now >= self._deadline:
            return "timeout"
        return None

    def _remaining(self) -> int:
        return len(self.expected) - len(self._outputs) - len(self._failed)

    def _quorum(self) -> int:
        mode, quorum = self.config.mode, self.config.quorum
        if mode == Mode.FIRST:
            return 1
        return quorum if mode == Mode.ENSEMBLE and quorum is not None else len(self.expected)

    def _complete(self) -> bool:
        got = len(self._outputs)
        if got >= self._quorum():
            return True
        return self.config.mode == Mode.MAJORITY and self._vote_decided()

    def _exhausted(self) -> bool:
        return self._remaining() == 0

    def _vote_decided(self) -> bool:
        """No outstanding vote can change any element's winner (needs at least one vote)."""
        return self._vote is not None and self._margin > self._remaining()

    def result(self) -> AggregateResult:
        """The aggregate; LocalProtocolError before :meth:`is_done` returned True."""
        if self._reason is None:
            raise LocalProtocolError("aggregation is not done yet")
        sources = tuple(sorted(self._outputs))
        failed = len(sources) < min(self.config.min_responses, self._quorum())
        if self._reason == "complete":
            failed = False
        value, tied, abstained = (None, (), ()) if failed else self._value(sources)
        return AggregateResult(
            self.config.mode, value, sources, self._reason != "complete" and not failed, failed,
            self._reason, tied, self.duplicates, self.late, abstained,
        )  # fmt: skip

    def _value(self, sources: tuple[str, ...]):
        mode, outputs = self.config.mode, self._outputs
        if mode == Mode.FIRST:
            return outputs[self._order[0]], (), ()
        if mode == Mode.ALL:
            return tuple(outputs[s] for s in sources), (), ()
        if mode == Mode.MAJORITY:  # every output in is counted (none is, once done)
            assert self._vote is not None  # (a result that is not failed has an output)
            winner, tied, none = self._vote.outcome()
            flat = (tuple(map(int, np.flatnonzero(where))) for where in (tied, none))
            return winner, *flat
        weights = np.array([self.config.weights.get(s, 1.0) for s in sources], np.float64)
        arrays = [outputs[s].astype(np.float64) for s in sources]
        value = _weighted_average(weights, arrays)
        return value.astype(_average_dtype(outputs[s] for s in sources)), (), ()


#: The power of two that float64 outputs too large to be summed are scaled down by (exactly).
_SUM_SCALE = 2.0**64


def _weighted_average(weights: np.ndarray, arrays: list[np.ndarray]) -> np.ndarray:
    """``sum(w x) / sum(w)`` in float64 (``weights`` positive and finite, of any ratio). Each
    weight is split into a mantissa ``m`` in [1, 2) and a power of two relative to the largest
    weight's (0 or less): ``w x`` is ``m x`` (rounded once) scaled by that power, exactly
    unless it falls below the normal floats. So no ratio of weights loses the lesser one (a
    weight 1e-30 beside 1e300 still counts, as it would have underflowed to 0 divided by the
    largest), huge weights cannot overflow the sums, and equal weights give the plain mean.
    Elements whose sum overflows though every input is finite (outputs near the float64
    limit) are summed again scaled down by :data:`_SUM_SCALE`, a power of two: finite. Every
    element is kept between its inputs, as an average is (rounding could step past the largest
    float, or past the largest input by an ulp where the inputs are subnormal); the others keep
    the plain sum, bit for bit. Non-finite inputs give what IEEE sums give: an infinity stays,
    a NaN (or opposite infinities) gives NaN."""
    mantissas, powers = np.frexp(weights)  # weights = mantissas * 2**powers, mantissas in [.5, 1)
    mantissas, shifts = mantissas * 2, powers - powers.max()  # now in [1, 2); shifts <= 0
    total_weight = np.ldexp(mantissas, shifts).sum()  # >= 1 (a lost term is below 2**-1022)

    def average(scale: float) -> np.ndarray:
        scaled = arrays if scale == 1.0 else [x / scale for x in arrays]
        terms = (np.ldexp(m * x, s) for m, s, x in zip(mantissas, shifts, scaled, strict=True))
        return sum(terms) / total_weight * scale

    with np.errstate(over="ignore", invalid="ignore"):
        value = average(1.0)
        unbounded = ~np.isfinite(value)
        if np.any(unbounded):  # overflowed, or an input was not finite
            overflowed = unbounded & np.all([np.isfinite(x) for x in arrays], axis=0)
            value = np.where(overflowed, average(_SUM_SCALE), value)
        # (a NaN input makes both bounds NaN, and the value is NaN already)
        return np.clip(
            value, functools.reduce(np.minimum, arrays), functools.reduce(np.maximum, arrays)
        )
