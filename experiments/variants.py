"""The optimizer variants the experiments compare: one registry.

A variant is what ``--optimizer`` names: how its optimizer is built (what runs
first, what runs second, how the swap is decided), how tables and plots name
and colour it, and how a budget sweep makes its runs. Every other module asks
this registry; none compares variant names.

Example:
  >>> from experiments import variants
  >>> variants.get("two-phase-fixed").label
  'two-phase (fixed split)'
  >>> [v.name for v in variants.REGISTRY.values() if v.second == "lbfgs"]
  ['adam-lbfgs']
  >>> variants.get("sgd")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: unknown variant 'sgd'; known: adam, two-phase, ...
"""

from __future__ import annotations

import dataclasses

FIRST_PHASES = ("adam", "adam-cosine")  # cosine: the rate decays over the run
SECOND_PHASES = ("cg", "lbfgs")
SWAPS = ("rule", "fixed")  # the swap rule reads the run, or at --swap-epoch
# How a budget sweep makes a variant's runs (experiments.budget_sweep):
SWEEP_RUNS = (
    "long",  # one run to the longest budget, read at every budget
    "per-budget",  # its own run per budget
    "tail",  # per budget, a tail from the long Adam run's kept checkpoint
    "detected-tail",  # one tail from the epoch the swap rule names
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One variant: how it trains and how it is shown.

    Attributes:
      name: the ``--optimizer`` value and the runs' folder name.
      label: its name in tables and legends.
      colour: its matplotlib colour.
      first: the first phase, one of :data:`FIRST_PHASES`; ``None``: none
        (CG from the start).
      second: the second phase, one of :data:`SECOND_PHASES`; ``None``: none
        (Adam alone).
      swap: how the swap is decided, one of :data:`SWAPS`, where there are
        two phases.
      sweep: how a budget sweep makes its runs, one of :data:`SWEEP_RUNS`;
        ``None``: not in sweeps.
      short: a shorter name for verdict lines; ``None``: ``label``.
    """

    name: str
    label: str
    colour: str
    first: str | None
    second: str | None
    swap: str | None = None
    sweep: str | None = None
    short: str | None = None

    def __post_init__(self):
        checks = {
            "first": self.first in (None, *FIRST_PHASES),
            "second": self.second in (None, *SECOND_PHASES),
            "swap": (self.swap in SWAPS) == self.two_phases,
            "sweep": self.sweep in (None, *SWEEP_RUNS),
        }
        if bad := [field for field, ok in checks.items() if not ok]:
            raise ValueError(f"Variant {self.name!r}: invalid {bad}.")

    @property
    def two_phases(self) -> bool:
        """Adam, then a second phase: ``tpo.two_phase`` builds it."""
        return self.first is not None and self.second is not None

    @property
    def has_second_phase(self) -> bool:
        """Whether it ever runs CG or L-BFGS (not Adam alone)."""
        return self.second is not None

    @property
    def short_label(self) -> str:
        """Its name in verdict lines ("cosine Adam")."""
        return self.short or self.label

    @property
    def baseline(self) -> bool:
        """Adam alone: what the second phases are judged against."""
        return self.second is None


ADAM = Variant("adam", "Adam", "tab:blue", "adam", None, sweep="long")
TWO_PHASE = Variant(
    "two-phase",
    "two-phase (detected swap)",
    "tab:red",
    "adam",
    "cg",
    swap="rule",
    sweep="detected-tail",
)
TWO_PHASE_FIXED = Variant(
    "two-phase-fixed",
    "two-phase (fixed split)",
    "tab:green",
    "adam",
    "cg",
    swap="fixed",
    sweep="tail",
)
CG = Variant("cg", "CG from the start", "tab:purple", None, "cg")
ADAM_LBFGS = Variant(
    "adam-lbfgs",
    "Adam then L-BFGS (fixed split)",
    "tab:orange",
    "adam",
    "lbfgs",
    swap="fixed",
    sweep="tail",
)
ADAM_COSINE = Variant(
    "adam-cosine",
    "Adam, cosine-decayed rate",
    "tab:cyan",
    "adam-cosine",
    None,
    sweep="per-budget",
    short="cosine Adam",
)

REGISTRY = {
    v.name: v for v in (ADAM, TWO_PHASE, TWO_PHASE_FIXED, CG, ADAM_LBFGS, ADAM_COSINE)
}
NAMES = tuple(REGISTRY)
# A budget sweep's variants, in the order of its tables.
SWEEP = tuple(
    v.name
    for v in (ADAM, ADAM_COSINE, TWO_PHASE_FIXED, TWO_PHASE, ADAM_LBFGS)
    if v.sweep is not None
)
BASELINES = tuple(name for name in SWEEP if REGISTRY[name].baseline)
# Two-phase variants in the sweep's order: those a verdict is written for.
TWO_PHASE_SWEEP = tuple(name for name in SWEEP if REGISTRY[name].two_phases)
# A tail per budget from the long Adam run (the fixed splits).
TAILS = tuple(name for name in SWEEP if REGISTRY[name].sweep == "tail")


def get(name: str) -> Variant:
    """The variant called ``name``; ``ValueError`` names the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(NAMES)}")
    return REGISTRY[name]
