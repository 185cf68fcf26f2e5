"""One training run's settings: ``Config``, its command line, the optimizer it names.

``Config`` holds the flags of ``python -m experiments.train`` (see
:func:`parse_args`); :func:`make_optimizer` builds the optax transformation
its variant (:mod:`experiments.variants`) and swap rule (:func:`swap_rule`)
describe.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import optax

import twophase_optax as tpo
from experiments import cli
from experiments import data as data_lib
from experiments import models
from experiments import variants
from twophase_optax.two_phase import FALLBACKS

OPTIMIZERS = variants.NAMES  # --optimizer: the registry's variants


# --swap-rule: the tpo.swap rules and combinations the runs use, mapped onto
# tpo.swap objects by swap_rule() (--optimizer two-phase-fixed is
# tpo.swap.at_step).
SWAP_RULES = ("peak", "plateau", "peak-then-plateau", "fit", "fit-or-plateau")


DEFAULT_SWAP_RULE = "fit-or-plateau"  # tpo.swap.default


# --paper-rule: the peak settings of tpo.swap.PAPER, Algorithm 1 as printed.
PAPER_RULE = dict(
    swap_rule="peak", gn_factor=0.9, smoothing=1.0, patience=1, min_rise=1.0
)


# Full-batch CG and L-BFGS evaluate the training set in chunks of at most this
# many images (twophase_optax.chunked_loss): chosen so that one full-batch value
# and gradient of every model needs at most 8 GiB of working memory at the
# paper's MNIST and CIFAR shapes (BENCHMARKS.md, "CG on a large training set").
DEFAULT_CG_CHUNK_SIZE = 2048


@dataclasses.dataclass
class Config:
    """One training run; the command-line flags map onto these fields."""

    model: str = "vit-mlp"
    dataset: str = "digits"
    optimizer: str = "two-phase"
    epochs: int = 100
    batch_size: int = 512
    cg_batch_size: int | None = None  # None: the whole training set.
    # CG and L-BFGS batches larger than this are evaluated in chunks of at most
    # this many images (twophase_optax.chunked_loss); 0: in one pass.
    cg_chunk_size: int = DEFAULT_CG_CHUNK_SIZE
    lr: float = 1e-3
    loss: str = models.DEFAULT_LOSS
    # two-phase: what decides the swap, one of SWAP_RULES, and the settings of
    # its tpo.swap parts (see swap_rule): the peak's,
    gn_factor: float = tpo.swap.DEFAULT_GN_FACTOR
    smoothing: float = tpo.swap.DEFAULT_SMOOTHING
    patience: int = tpo.swap.DEFAULT_PATIENCE
    min_rise: float = tpo.swap.DEFAULT_MIN_RISE
    swap_rule: str = DEFAULT_SWAP_RULE
    # the plateau's,
    plateau_rtol: float = tpo.swap.DEFAULT_RTOL
    plateau_patience: int = tpo.swap.DEFAULT_PLATEAU_PATIENCE
    plateau_smoothing: float = tpo.swap.DEFAULT_PLATEAU_SMOOTHING
    # and the fit rule's: the most training examples an epoch's steps may get
    # wrong, and such epochs in a row before the swap.
    fit_errors: int = tpo.swap.DEFAULT_MAX_ERRORS
    fit_patience: int = tpo.swap.DEFAULT_FIT_PATIENCE
    swap_epoch: int = 30
    fallback: str | None = None  # two_phase's fallback: None or "first".
    max_failures: int = 3
    seed: int = 0
    out: str = "runs/digits/vit-mlp/two-phase"
    data_dir: str | None = None
    resume: bool = False
    progress: bool = True
    label: str = ""  # A prefix for the progress bar ("run 2/10: ").
    curvature_every: int = 0  # Probe the Hessian every N epochs; 0: never.
    curvature_iterations: int = 20  # Lanczos steps (Hessian-vector products).
    curvature_batch: int = 512  # The fixed probe batch: the first N images.
    mesh: str | None = None  # "data=N[,model=M]"; None: data-parallel, all devices.
    distributed: bool = False  # Call jax.distributed.initialize() first.
    coordinator: str | None = None  # host:port; None: detected (SLURM, TPU, ...).
    num_processes: int | None = None
    process_id: int | None = None
    # Checkpoints kept for good (beside the last two) at these epochs, in
    # <out>/kept: the epochs a budget sweep starts its second phases from.
    keep_epochs: tuple[int, ...] = ()
    # Adam only: also keep the checkpoint of the epoch whose gradient-norm
    # reading makes the swap detector (gn_factor, smoothing, patience,
    # min_rise) fire, found by tpo.swap.replay on the readings so far.
    keep_detected: bool = False
    # Start from another run's kept checkpoint instead of from scratch: the
    # Adam run's directory and the epoch whose end state is taken; this run's
    # epochs from prefix_epoch + 1 on are its own (see Trainer.start_from).
    prefix_run: str | None = None
    prefix_epoch: int = -1

    @property
    def variant(self) -> variants.Variant:
        """``optimizer``'s entry in :mod:`experiments.variants`."""
        return variants.get(self.optimizer)

    def validate(self) -> None:
        variant = variants.REGISTRY.get(self.optimizer)  # None: reported below
        checks = {
            "model": self.model in models.MODEL_NAMES
            and (self.model in models.TEXT_VARIANTS)
            == (self.dataset in data_lib.TEXT_NAMES),
            "dataset": self.dataset in data_lib.DATASET_NAMES,
            "optimizer": self.optimizer in OPTIMIZERS,
            "loss": self.loss in models.LOSSES,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "cg_batch_size": self.cg_batch_size is None or self.cg_batch_size >= 1,
            "cg_chunk_size": self.cg_chunk_size >= 0,
            "lr": self.lr > 0,
            "swap_epoch": self.swap_epoch >= 0,
            "fallback": self.fallback in FALLBACKS,
            "max_failures": self.max_failures >= 1,
            "swap_rule": self.swap_rule in SWAP_RULES,
            "curvature_every": self.curvature_every >= 0,
            "curvature_iterations": self.curvature_iterations >= 1,
            "curvature_batch": self.curvature_batch >= 1,
            "keep_epochs": all(e >= 0 for e in self.keep_epochs),
            "keep_detected": not self.keep_detected or variant is variants.ADAM,
            "prefix_epoch": self.prefix_run is None
            or (
                variant is not None
                and variant.two_phases
                and 0 <= self.prefix_epoch < self.epochs
                and (variant.swap == "rule" or self.prefix_epoch + 1 == self.swap_epoch)
            ),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"Invalid setting(s) {bad} in {self}.")
        swap_rule(self)  # The rule's settings: tpo.swap's factories check them.


def make_optimizer(
    config: Config, adam_steps_per_epoch: int, mini_batch_cg: bool = False
):
    """The optax transformation for ``config.optimizer``.

    CG on mini-batches searches with values only and keeps the previous
    gradient: a gradient stored by the line search belongs to the last batch,
    and the next step, on another batch, could not use it.
    """
    variant = config.variant
    if variant.first == "adam-cosine":
        steps = config.epochs * adam_steps_per_epoch
        adam = optax.adam(optax.cosine_decay_schedule(config.lr, steps))
    else:
        adam = optax.adam(config.lr)
    if variant.second is None:
        return adam
    cg = tpo.conjugate_gradient(
        linesearch=tpo.slope_linesearch() if mini_batch_cg else None
    )
    if variant.first is None:
        return cg
    if variant.swap == "fixed" and not config.prefix_run:
        rule = tpo.swap.at_step(config.swap_epoch * adam_steps_per_epoch)
    else:
        # A tail (prefix_run) starts in the second phase, where the rule plays
        # no part: with the detected swap's rule the tails of every budget
        # and the detected swap's are one program, compiled once.
        rule = swap_rule(config, adam_steps_per_epoch)
    return tpo.two_phase(
        adam,
        optax.lbfgs() if variant.second == "lbfgs" else cg,
        swap=rule,
        fallback=config.fallback,
        max_failures=config.max_failures,
    )


def swap_rule(config: Config, steps_per_epoch: int | None = None) -> tpo.swap.SwapRule:
    """``config.swap_rule`` and its settings as a ``tpo.swap`` rule.

    Read once per epoch of ``steps_per_epoch`` steps; ``None``: the rule
    without its window, for :func:`tpo.swap.replay` on per-epoch rows. The
    one place where the command line's rules become ``tpo.swap`` objects.
    """
    return _swap_rule(
        config.swap_rule,
        (config.gn_factor, config.smoothing, config.patience, config.min_rise),
        (config.plateau_rtol, config.plateau_patience, config.plateau_smoothing),
        (config.fit_errors, config.fit_patience),
        steps_per_epoch,
    )


@functools.lru_cache(maxsize=32)
def _swap_rule(name, peak, plateau, fitted, steps_per_epoch) -> tpo.swap.SwapRule:
    # Cached: the same settings give the same rule object, whose replay
    # compiles once.
    gn_factor, smoothing, patience, min_rise = peak
    peak = tpo.swap.peak(
        gn_factor, smoothing=smoothing, patience=patience, min_rise=min_rise
    )
    rtol, patience, smoothing = plateau
    plateau = tpo.swap.plateau(rtol, patience=patience, smoothing=smoothing)
    fitted = tpo.swap.fitted(fitted[0], patience=fitted[1])
    rule = {
        "peak": peak,
        "plateau": plateau,
        "peak-then-plateau": tpo.swap.after(peak, plateau),
        "fit": fitted,
        "fit-or-plateau": tpo.swap.any_of(fitted, plateau),
    }[name]
    if steps_per_epoch is None:
        return rule
    return tpo.swap.per_window(rule, steps=steps_per_epoch)


def add_loss_argument(parser: argparse.ArgumentParser) -> None:
    """``--loss``, shared by the scripts that train."""
    parser.add_argument(
        "--loss",
        default=models.DEFAULT_LOSS,
        choices=tuple(models.LOSSES),
        help="softmax_mse (default): MSE of the softmax outputs against one-hot "
        "targets; mse: MSE of the raw outputs; xent: cross-entropy",
    )


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=defaults.model, choices=models.MODEL_NAMES)
    parser.add_argument(
        "--dataset", default=defaults.dataset, choices=data_lib.DATASET_NAMES
    )
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--epochs", type=cli.integer(1), default=defaults.epochs)
    parser.add_argument(
        "--batch-size", type=cli.integer(1), default=defaults.batch_size
    )
    parser.add_argument(
        "--cg-batch-size",
        type=cli.integer(1),
        default=None,
        help="batch size of the CG phase (default: the whole training set)",
    )
    parser.add_argument(
        "--cg-chunk-size",
        type=cli.integer(0),
        default=defaults.cg_chunk_size,
        help="CG and L-BFGS evaluate batches larger than this in chunks of at "
        f"most this many images, in bounded memory (default "
        f"{DEFAULT_CG_CHUNK_SIZE}: at most 8 GiB for every model on MNIST and "
        "CIFAR); 0: in one pass",
    )
    parser.add_argument("--lr", type=cli.POSITIVE, default=defaults.lr)
    add_loss_argument(parser)
    parser.add_argument(
        "--gn-factor",
        type=cli.FRACTION,
        default=defaults.gn_factor,
        help="two-phase: swap once the smoothed reading falls to this fraction "
        "of its maximum, in (0, 1) (the paper's 0.9 is for raw readings)",
    )
    parser.add_argument(
        "--smoothing",
        type=cli.number(0.0, 1.0, low_open=True),
        default=defaults.smoothing,
        help="two-phase: weight of the newest reading in the moving average, "
        "in (0, 1]; 1 tests the raw reading",
    )
    parser.add_argument(
        "--patience",
        type=cli.integer(1),
        default=defaults.patience,
        help="two-phase: readings in a row below the threshold before the swap",
    )
    parser.add_argument(
        "--min-rise",
        type=cli.number(1.0),
        default=defaults.min_rise,
        help="two-phase: no fall counts before the maximum is this multiple of "
        "the first reading (>= 1)",
    )
    parser.add_argument(
        "--paper-rule",
        action="store_true",
        help="two-phase: Algorithm 1 as printed (same as --swap-rule peak "
        "--gn-factor 0.9 --smoothing 1 --patience 1 --min-rise 1)",
    )
    parser.add_argument(
        "--swap-rule",
        default=defaults.swap_rule,
        choices=SWAP_RULES,
        help="two-phase: what decides the swap: the gradient-norm peak, the "
        "loss plateau, the plateau once the peak has fired, fit (epochs whose "
        "steps got at most --fit-errors training examples wrong), or fit or "
        "the plateau, whichever comes first",
    )
    parser.add_argument(
        "--plateau-rtol",
        type=cli.number(0.0, 1.0, high_open=True),
        default=defaults.plateau_rtol,
        help="two-phase, plateau rules: the relative fall of the smoothed "
        "epoch loss that counts as progress, in [0, 1)",
    )
    parser.add_argument(
        "--plateau-patience",
        type=cli.integer(1),
        default=defaults.plateau_patience,
        help="two-phase, plateau rules: epochs without progress before the swap",
    )
    parser.add_argument(
        "--plateau-smoothing",
        type=cli.number(0.0, 1.0, low_open=True),
        default=defaults.plateau_smoothing,
        help="two-phase, plateau rules: weight of the newest epoch's mean loss "
        "in the moving average, in (0, 1]",
    )
    parser.add_argument(
        "--fit-errors",
        type=cli.integer(0),
        default=defaults.fit_errors,
        help="two-phase, fit rule: the most training examples an epoch may get "
        "wrong (0: all right)",
    )
    parser.add_argument(
        "--fit-patience",
        type=cli.integer(1),
        default=defaults.fit_patience,
        help="two-phase, fit rules: fitted epochs in a row before the swap",
    )
    parser.add_argument(
        "--swap-epoch",
        type=cli.integer(0),
        default=defaults.swap_epoch,
        help="first CG epoch of two-phase-fixed",
    )
    parser.add_argument(
        "--fallback",
        default="none",
        choices=("none", "first"),
        help="two-phase: after --max-failures failed line searches in a row, "
        "stay in CG ('none', the default) or return to Adam ('first')",
    )
    parser.add_argument(
        "--max-failures", type=cli.integer(1), default=defaults.max_failures
    )
    parser.add_argument(
        "--curvature-every",
        type=cli.integer(0),
        default=0,
        help="every N epochs record the smallest and largest Hessian "
        "eigenvalue of the loss on a fixed probe batch (Lanczos); 0: never",
    )
    parser.add_argument(
        "--curvature-iterations",
        type=cli.integer(1),
        default=defaults.curvature_iterations,
        help="Lanczos steps (Hessian-vector products) per curvature probe",
    )
    parser.add_argument(
        "--curvature-batch",
        type=cli.integer(1),
        default=defaults.curvature_batch,
        help="images in the fixed curvature probe batch",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=None, help="default: runs/DATASET/MODEL/OPT")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--mesh",
        default=None,
        help="device mesh 'data=N[,model=M]' (default: data-parallel over all "
        "devices); the model axis splits parameters along their last dimension",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() first (one process "
        "per host; see docs/scaling.md)",
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        help="with --distributed: process 0's host:port (default: detected from "
        "the cluster environment, e.g. SLURM or a TPU pod)",
    )
    parser.add_argument("--num-processes", type=cli.integer(1), default=None)
    parser.add_argument("--process-id", type=cli.integer(0), default=None)
    args = vars(parser.parse_args(argv))
    check_model_fits_dataset(parser, args["model"], args["dataset"])
    args["fallback"] = None if args["fallback"] == "none" else args["fallback"]
    if args.pop("paper_rule"):
        args.update(PAPER_RULE)
    if args["out"] is None:
        args["out"] = f"runs/{args['dataset']}/{args['model']}/{args['optimizer']}"
    return Config(**args)


def check_model_fits_dataset(
    parser, model: str, dataset: str, flag: str = "--model"
) -> None:
    """A text model on images, or an image model on text, is a usage error."""
    text = dataset in data_lib.TEXT_NAMES
    if (model in models.TEXT_VARIANTS) != text:
        choices = models.TEXT_VARIANTS if text else models.IMAGE_MODEL_NAMES
        parser.error(
            f"argument {flag}: {model!r} does not fit --dataset {dataset!r}; "
            f"choose one of {tuple(choices)}"
        )
