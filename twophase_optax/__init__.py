"""twophase_optax: Adam until the loss turns convex, then nonlinear conjugate gradient.

Optax transformations for the convexity-dependent two-phase training method
(Hrycej et al., KDIR 2025): a golden-section line search, nonlinear conjugate
gradient built on it, and the two-phase combinator.
"""

from twophase_optax import cg_directions
from twophase_optax import curvature
from twophase_optax import fitted
from twophase_optax import loss_plateau
from twophase_optax import swap_detection
from twophase_optax._protocol import find_linesearch_state
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
from twophase_optax.fitted import FittedState
from twophase_optax.golden_section import GoldenSectionInfo
from twophase_optax.golden_section import GoldenSectionLinesearchState
from twophase_optax.golden_section import golden_section_linesearch
from twophase_optax.loss_plateau import LossPlateauState
from twophase_optax.metrics import two_phase_metrics
from twophase_optax.slope_linesearch import SlopeLinesearchInfo
from twophase_optax.slope_linesearch import SlopeLinesearchState
from twophase_optax.slope_linesearch import slope_linesearch
from twophase_optax.swap_detection import GradientNormPeakState
from twophase_optax.two_phase import DEFAULT_SWAP_RULE
from twophase_optax.two_phase import SWAP_RULES
from twophase_optax.two_phase import SharedBuffer
from twophase_optax.two_phase import TwoPhaseState
from twophase_optax.two_phase import start_second_phase
from twophase_optax.two_phase import two_phase

__version__ = "0.1.0"

__all__ = [
    "BETA_RULES",
    "ConjugateGradientInfo",
    "ConjugateGradientState",
    "DEFAULT_SWAP_RULE",
    "FittedState",
    "GoldenSectionInfo",
    "GoldenSectionLinesearchState",
    "GradientNormPeakState",
    "LossPlateauState",
    "SWAP_RULES",
    "SharedBuffer",
    "SlopeLinesearchInfo",
    "SlopeLinesearchState",
    "TwoPhaseState",
    "cg_directions",
    "chunked_loss",
    "conjugate_gradient",
    "curvature",
    "dai_yuan",
    "find_linesearch_state",
    "fitted",
    "fletcher_reeves",
    "golden_section_linesearch",
    "hestenes_stiefel",
    "linesearch_failed",
    "loss_plateau",
    "polak_ribiere",
    "polak_ribiere_plus",
    "hager_zhang",
    "slope_linesearch",
    "start_second_phase",
    "swap_detection",
    "two_phase",
    "two_phase_metrics",
]
