"""twophase_optax: Adam until the loss turns convex, then nonlinear conjugate gradient.

Optax transformations for the convexity-dependent two-phase training method
(Hrycej et al., KDIR 2025): a golden-section line search, nonlinear conjugate
gradient built on it, swap rules (:mod:`twophase_optax.swap`) and the
two-phase combinator.
"""

from twophase_optax import cg_directions
from twophase_optax import curvature
from twophase_optax import swap
from twophase_optax._protocol import find_linesearch_state
from twophase_optax._protocol import linesearch_cost
from twophase_optax._protocol import linesearch_evaluations
from twophase_optax.cg_directions import BETA_RULES
from twophase_optax.cg_directions import dai_yuan
from twophase_optax.cg_directions import fletcher_reeves
from twophase_optax.cg_directions import hager_zhang
from twophase_optax.cg_directions import hestenes_stiefel
from twophase_optax.cg_directions import polak_ribiere
from twophase_optax.cg_directions import polak_ribiere_plus
from twophase_optax.chunked_loss import chunked_loss
from twophase_optax.conjugate_gradient import ConjugateGradientInfo
from twophase_optax.conjugate_gradient import ConjugateGradientState
from twophase_optax.conjugate_gradient import conjugate_gradient
from twophase_optax.conjugate_gradient import linesearch_failed
from twophase_optax.fit import FitResult
from twophase_optax.fit import fit
from twophase_optax.golden_section import GoldenSectionInfo
from twophase_optax.golden_section import GoldenSectionLinesearchState
from twophase_optax.golden_section import golden_section_linesearch
from twophase_optax.metrics import two_phase_metrics
from twophase_optax.slope_linesearch import SlopeLinesearchInfo
from twophase_optax.slope_linesearch import SlopeLinesearchState
from twophase_optax.slope_linesearch import slope_linesearch
from twophase_optax.two_phase import TwoPhaseState
from twophase_optax.two_phase import start_second_phase
from twophase_optax.two_phase import two_phase
from twophase_optax.value_and_grad import value_and_grad_from_state

__version__ = "0.2.1"

__all__ = [
    "BETA_RULES",
    "ConjugateGradientInfo",
    "ConjugateGradientState",
    "FitResult",
    "GoldenSectionInfo",
    "GoldenSectionLinesearchState",
    "SlopeLinesearchInfo",
    "SlopeLinesearchState",
    "TwoPhaseState",
    "cg_directions",
    "chunked_loss",
    "conjugate_gradient",
    "curvature",
    "dai_yuan",
    "find_linesearch_state",
    "fit",
    "fletcher_reeves",
    "golden_section_linesearch",
    "hestenes_stiefel",
    "linesearch_cost",
    "linesearch_evaluations",
    "linesearch_failed",
    "polak_ribiere",
    "polak_ribiere_plus",
    "hager_zhang",
    "slope_linesearch",
    "start_second_phase",
    "swap",
    "two_phase",
    "two_phase_metrics",
    "value_and_grad_from_state",
]
