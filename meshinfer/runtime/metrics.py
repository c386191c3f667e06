"""A small Prometheus registry of our own: Counter, Gauge, Histogram with labels, and the text
exposition format 0.0.4 (HELP/TYPE lines, label value escaping). The daemons' ``/metrics`` use it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from meshinfer.errors import LocalProtocolError

log = logging.getLogger(__name__)

# --- Prometheus text exposition (format 0.0.4) ------------------------------------------------

# (whole names, by ``fullmatch``: ``$`` also matched before a final newline, so a name ending
# in one passed and split its line of the page in two)
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    """One exposition line: full sample name (with any ``_bucket`` suffix), labels, value."""

    name: str
    labels: Labels
    value: float


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """A metric's HELP/TYPE header and its samples. ``kind``: counter, gauge, histogram."""

    name: str
    kind: str
    help: str
    samples: tuple[Sample, ...]


def family(
    name: str, kind: str, help: str, samples: Iterable[tuple[dict[str, str], float]]
) -> MetricFamily:
    """A family of plain samples, each given as ``(labels, value)``."""
    return MetricFamily(
        name, kind, help, tuple(Sample(name, tuple(sorted(lbl.items())), v) for lbl, v in samples)
    )


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (``+Inf``, ``-Inf``, ``NaN``, Go-style floats)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    """Escape backslash, double quote and newline in a label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Escape backslash and newline in HELP text."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render_family(family: MetricFamily) -> str:
    """The HELP and TYPE lines and every sample line of ``family``."""
    lines = [
        f"# HELP {family.name} {escape_help(family.help)}",
        f"# TYPE {family.name} {family.kind}",
    ]
    for sample in family.samples:
        labels = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sample.labels)
        lines.append(
            f"{sample.name}{{{labels}}} {format_value(sample.value)}"
            if labels
            else f"{sample.name} {format_value(sample.value)}"
        )
    return "\n".join(lines) + "\n"


def _check_names(name: str, labelnames: Iterable[str], reserved: Iterable[str] = ()) -> None:
    if not _METRIC_NAME.fullmatch(name):
        raise LocalProtocolError(f"invalid metric name {name!r}")
    for label in labelnames:
        if not _LABEL_NAME.fullmatch(label) or label.startswith("__") or label in reserved:
            raise LocalProtocolError(f"invalid label name {label!r} for metric {name}")


class _Metric:
    """Shared frame: a name, help text, label names and one child per label-value tuple."""

    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        _check_names(name, self.labelnames, self._reserved_labels())
        self._children: dict[tuple[str, ...], Any] = {}

    def _reserved_labels(self) -> tuple[str, ...]:
        return ()

    def labels(self, *values: object, **named: object) -> Any:
        """The child for these label values (positional, or by name); created on first use."""
        if named:
            if values or set(named) != set(self.labelnames):
                raise LocalProtocolError(f"{self.name} takes labels {self.labelnames}")
            values = tuple(named[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise LocalProtocolError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        if key not in self._children:
            self._children[key] = self._new_child()
        return self._children[key]

    def _only_child(self) -> Any:
        if self.labelnames:
            raise LocalProtocolError(f"{self.name} has labels {self.labelnames}: use .labels()")
        return self.labels()

    def _new_child(self) -> Any:
        raise NotImplementedError

    def _label_pairs(self, key: tuple[str, ...]) -> Labels:
        return tuple(zip(self.labelnames, key, strict=True))

    def collect(self) -> MetricFamily:
        """This metric as a family of samples."""
        samples = [s for key, child in self._children.items() for s in self._samples(key, child)]
        return MetricFamily(self.name, self.kind, self.help, tuple(samples))

    def _samples(self, key: tuple[str, ...], child: Any) -> list[Sample]:
        return [Sample(self.name, self._label_pairs(key), child.value)]


class _Value:
    def __init__(self) -> None:
        self.value = 0.0


class _CounterChild(_Value):
    def inc(self, amount: float = 1.0) -> None:
        # (NaN and +Inf too: a counter at NaN or +Inf would stay there for good)
        if not 0 <= amount < math.inf:
            raise LocalProtocolError(
                f"a counter only goes up by a finite amount; got inc({amount})"
            )
        self.value += amount


class _GaugeChild(_Value):
    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Counter(_Metric):
    """A cumulative count. By convention its name ends in ``_total``."""

    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0) to the unlabelled counter."""
        self._only_child().inc(amount)


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def set(self, value: float) -> None:
        """Set the unlabelled gauge."""
        self._only_child().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Raise the unlabelled gauge."""
        self._only_child().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Lower the unlabelled gauge."""
        self._only_child().dec(amount)


class _HistogramChild:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.bucket_counts = [0] * (len(bounds) + 1)  # last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # a NaN or infinite value would leave ``_sum`` at NaN or +-Inf for good (and the rate
        # of every query over it): refused, nothing recorded
        if not math.isfinite(value):
            raise LocalProtocolError(f"a histogram observes finite values; got {value}")
        self.bucket_counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class Histogram(_Metric):
    """Observations counted in cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.buckets = tuple(sorted(float(b) for b in buckets if b != math.inf))
        distinct = len(set(self.buckets)) == len(self.buckets)
        if not self.buckets or not distinct or not all(map(math.isfinite, self.buckets)):
            raise LocalProtocolError(f"histogram {name} needs distinct finite buckets")
        super().__init__(name, help, labelnames)

    def _reserved_labels(self) -> tuple[str, ...]:
        return ("le",)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        """Record one observation (finite) in the unlabelled histogram."""
        self._only_child().observe(value)

    def _samples(self, key: tuple[str, ...], child: _HistogramChild) -> list[Sample]:
        counts = itertools.accumulate(child.bucket_counts)
        bounds = (*self.buckets, math.inf)
        return histogram_samples(
            self.name, self._label_pairs(key), zip(bounds, counts, strict=True), child.sum
        )


def histogram_samples(
    name: str, labels: Labels, cumulative: Iterable[tuple[float, int]], total: float
) -> list[Sample]:
    """``_bucket`` (cumulative, ending with ``+Inf``), ``_sum`` and ``_count`` samples."""
    samples = [
        Sample(f"{name}_bucket", (*labels, ("le", format_value(bound))), count)
        for bound, count in cumulative
    ]
    if samples[-1].labels[-1][1] != "+Inf":
        raise LocalProtocolError(f"histogram {name} must end with a +Inf bucket")
    count = samples[-1].value
    return [*samples, Sample(f"{name}_sum", labels, total), Sample(f"{name}_count", labels, count)]


class MetricsRegistry:
    """Owns metrics and collectors and renders them all. Event-loop only (not thread-safe)."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], Iterable[MetricFamily]]] = []
        self._refused: set[str] = set()  # families already logged as left out (once each)

    def _register(self, metric: _Metric) -> Any:
        if metric.name in self._metrics:
            raise LocalProtocolError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        """Register and return a counter."""
        return self._register(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        """Register and return a gauge."""
        return self._register(Gauge(name, help, labelnames))

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Register and return a histogram."""
        return self._register(Histogram(name, help, labelnames, buckets))

    def add_collector(self, collect: Callable[[], Iterable[MetricFamily]]) -> None:
        """Call ``collect`` at every render for families computed on demand (e.g. batcher stats).

        A collector that raises (a generator: at any point) is logged and left out of that
        render, whatever it yielded before; the rest still renders. So is a family it yields
        that cannot be written (a name or label name outside the charset or not a str, a value
        that is not a number, a series twice, not a family at all), and a series that one of
        the same name already gave: one bad line made a scraper drop the whole page (or a value
        of None made rendering raise).
        """
        self._collectors.append(collect)

    def families(self, extra: Iterable[MetricFamily] = ()) -> list[MetricFamily]:
        """Every registered metric, then every collector's families, then ``extra`` (families
        computed by the caller, checked as a collector's are); families of one name are
        merged into one (one HELP and TYPE line each, their samples together, as the text
        format requires), and one whose kind differs from the first of its name is left out."""
        out = {metric.name: metric.collect() for metric in self._metrics.values()}
        for collect in [*self._collectors, lambda: extra]:
            try:
                collected = list(collect())
            except Exception:
                log.exception("metrics collector %r failed; its families are left out", collect)
                continue
            for fam in collected:
                try:
                    why = family_problem(fam) or _merge_into(out, fam)
                # not a family to check at all (a name or label name not a str, labels not
                # pairs, not a MetricFamily): it raised out of the page, which answered 500
                except Exception as exc:
                    why = f"it cannot be read as a family: {exc!r}"
                name = getattr(fam, "name", None)
                name = name if isinstance(name, str) else repr(type(fam))
                if why and name not in self._refused:
                    self._refused.add(name)  # (logged once: scraped every few seconds)
                    log.error("metric family %r left out: %s", name, why)
        return list(out.values())

    def render(self, extra: Iterable[MetricFamily] = ()) -> str:
        """The Prometheus text exposition (format 0.0.4) of everything registered, and of
        ``extra`` (see :meth:`families`)."""
        return "".join(render_family(family) for family in self.families(extra))


def _merge_into(families: dict[str, MetricFamily], fam: MetricFamily) -> str | None:
    """Add ``fam`` to ``families`` (by name): its samples join those of a family of its name.
    Returns why it was left out (another kind), or why some of its samples were (series the
    family of its name has already), else None."""
    known = families.get(fam.name)
    if known is None:
        families[fam.name] = fam
        return None
    if known.kind != fam.kind:
        return f"it is a {fam.kind} and a {known.kind} of that name came first"
    have = {(s.name, s.labels) for s in known.samples}
    new = tuple(s for s in fam.samples if (s.name, s.labels) not in have)
    families[fam.name] = MetricFamily(known.name, known.kind, known.help, known.samples + new)
    return None if len(new) == len(fam.samples) else "series given twice (the later ones dropped)"


_KINDS = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def family_problem(fam: MetricFamily) -> str | None:
    """Why ``fam`` cannot be written as the text format wants, or None: its kind, a metric or
    label name outside the charset, a sample name not of the family, a value that is not a
    real number (NaN and infinities are) or an integer beyond a float's range, HELP text or a
    label value not a string of UTF-8 (a lone surrogate), or a series twice. (Each of these
    raised as the page was written or encoded: the whole ``/metrics`` answered 500.)"""
    suffixes = _KINDS.get(fam.kind)
    if suffixes is None or not _METRIC_NAME.fullmatch(fam.name):
        return f"kind {fam.kind!r} or name {fam.name!r} is not one the text format has"
    if not _utf8(fam.help):
        return "its HELP text is not a string of UTF-8"
    seen: set[tuple[str, Labels]] = set()
    for s in fam.samples:
        names = [k for k, _ in s.labels]
        if s.name not in {fam.name + suffix for suffix in suffixes}:
            return f"sample {s.name!r} is not of the family"
        if len(set(names)) != len(names) or not all(map(_LABEL_NAME.fullmatch, names)):
            return f"label names {names!r} are not the text format's"
        if not all(_utf8(v) for _, v in s.labels):
            return f"label values of {names!r} are not all strings of UTF-8"
        if isinstance(s.value, bool) or not isinstance(s.value, int | float):
            return f"value {s.value!r} is not a number"
        if isinstance(s.value, int) and not _fits_float(s.value):
            return f"value of {s.name}{dict(s.labels)} is beyond a float's range"
        if (s.name, s.labels) in seen:
            return f"series {s.name}{dict(s.labels)} given twice"
        seen.add((s.name, s.labels))
    return _histogram_problem(fam) if fam.kind == "histogram" else None


def _utf8(text: object) -> bool:
    """``text`` is a str that encodes as UTF-8 (no lone surrogate, as JSON's ``\\ud800`` gives)."""
    if not isinstance(text, str):
        return False
    try:
        text.isascii() or text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _fits_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _histogram_problem(fam: MetricFamily) -> str | None:
    """Why a histogram's buckets are not ones: per series, ``le`` bounds that are numbers and
    rise, ending at ``+Inf``; counts that never fall; ``_count`` that of ``+Inf``. (A
    collector's own histogram went out unchecked: a scraper refused the page, or a quantile
    over it read nonsense.)"""
    buckets: dict[Labels, list[tuple[float, float]]] = {}
    for s in fam.samples:
        if s.name.endswith("_bucket"):
            series = tuple(pair for pair in s.labels if pair[0] != "le")
            le = dict(s.labels).get("le", "")
            bound = float(le) if _LE.fullmatch(le) else math.nan
            buckets.setdefault(series, []).append((bound, s.value))
    counts = {s.labels: s.value for s in fam.samples if s.name == f"{fam.name}_count"}
    for series, pairs in buckets.items():
        bounds, values = [b for b, _ in pairs], [v for _, v in pairs]
        if any(map(math.isnan, bounds)) or bounds != sorted(set(bounds)) or bounds[-1] != math.inf:
            return f"bucket bounds {bounds} of {dict(series)} do not rise to +Inf"
        if not all(0 <= a <= b for a, b in itertools.pairwise([0, *values])):
            return f"bucket counts {values} of {dict(series)} fall or are not numbers"
        if series in counts and counts[series] != values[-1]:
            return f"_count of {dict(series)} is not its +Inf bucket's"
    return None


_LE = re.compile(r"[+-]?(Inf|[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?)")
