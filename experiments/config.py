"""One training run's settings: ``Config``, its command line, the optimizer it names.

``Config`` is four sections: :class:`RunConfig` (model, data, budget, output),
:class:`OptimizerConfig` (the variant of :mod:`experiments.variants`, its
learning rate, its second phase's batches, and the swap rule in
:class:`SwapConfig`), :class:`MeshConfig` (devices and hosts) and
:class:`ProbeConfig` (the curvature probe). Every field that is a flag of
``python -m experiments.train`` says so in its metadata (its flag, help, and
the type that parses it); :func:`parse_args` builds the parser from the
fields, so a new setting is one field. A setting's range is checked where it
is used: the swap rule's by ``tpo.swap``'s factories, the fallback's by
``tpo.two_phase``; on the command line a value out of range is one line that
names the flag and the range.

Example:
  >>> config = parse_args(["--epochs", "3", "--swap-rule", "plateau"])
  >>> config.run.epochs, config.optimizer.name, config.optimizer.swap.rule
  (3, 'two-phase', 'plateau')
  >>> config == Config.of(epochs=3, swap_rule="plateau")
  True
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any

import optax

import twophase_optax as tpo
from experiments import cli
from experiments import data as data_lib
from experiments import models
from experiments import variants
from twophase_optax.two_phase import FALLBACKS

OPTIMIZERS = variants.NAMES  # --optimizer: the registry's variants


# --swap-rule: the tpo.swap rules and combinations the runs use, mapped onto
# tpo.swap objects by SwapConfig.make() (--optimizer two-phase-fixed is
# tpo.swap.at_step).
SWAP_RULES = ("peak", "plateau", "peak-then-plateau", "fit", "fit-or-plateau")


DEFAULT_SWAP_RULE = "fit-or-plateau"  # tpo.swap.default


# --paper-rule: the peak settings of tpo.swap.PAPER, Algorithm 1 as printed.
PAPER_RULE = dict(
    swap_rule="peak",
    gn_factor=0.9,
    smoothing=1.0,
    patience=1,
    min_rise=1.0,
    late_swap=True,
)


# Full-batch CG and L-BFGS evaluate the training set in chunks of at most this
# many images (twophase_optax.chunked_loss): chosen so that one full-batch value
# and gradient of every model needs at most 8 GiB of working memory at the
# paper's MNIST and CIFAR shapes (BENCHMARKS.md, "CG on a large training set").
DEFAULT_CG_CHUNK_SIZE = 2048


def flag(default: Any, help: str = "", **argument: Any) -> Any:
    """A field that is a command-line flag.

    ``argument``: what ``parser.add_argument`` takes beyond the flag's name
    (``type``, ``choices``, ``action``), plus ``dest``, the flat name the
    flag and :meth:`Config.of` use where the field's own name is not enough
    (``optimizer.name`` is ``--optimizer``).
    """
    metadata = {"flag": True, "help": help, **argument}
    return dataclasses.field(default=default, metadata=metadata)


def _peak(**setting):
    return tpo.swap.peak(**{"gn_factor": tpo.swap.DEFAULT_GN_FACTOR, **setting})


def _checked(factory, name: str, parse=float):
    """The flag type whose range is ``factory``'s for its argument ``name``."""
    return cli.checked_by(parse, lambda value: factory(**{name: value}))


def _two_phase(**setting):
    return tpo.two_phase(swap=tpo.swap.manual(), **setting)


@dataclasses.dataclass(frozen=True)
class SwapConfig:
    """What decides the swap of ``two-phase``: one of :data:`SWAP_RULES` and
    the settings of its ``tpo.swap`` parts (:meth:`make`)."""

    rule: str = flag(
        DEFAULT_SWAP_RULE,
        "two-phase: what decides the swap: the gradient-norm peak, the loss "
        "plateau, the plateau once the peak has fired, fit (epochs whose steps "
        "got at most --fit-errors training examples wrong), or fit or the "
        "plateau, whichever comes first",
        choices=SWAP_RULES,
        dest="swap_rule",
    )
    # The peak's settings (tpo.swap.peak),
    gn_factor: float = flag(
        tpo.swap.DEFAULT_GN_FACTOR,
        "two-phase: swap once the smoothed reading falls to this fraction of "
        "its maximum, in (0, 1) (the paper's 0.9 is for raw readings)",
        type=_checked(tpo.swap.peak, "gn_factor"),
    )
    smoothing: float = flag(
        tpo.swap.DEFAULT_SMOOTHING,
        "two-phase: weight of the newest reading in the moving average, in "
        "(0, 1]; 1 tests the raw reading",
        type=_checked(_peak, "smoothing"),
    )
    patience: int = flag(
        tpo.swap.DEFAULT_PATIENCE,
        "two-phase: readings in a row below the threshold before the swap",
        type=_checked(_peak, "patience", int),
    )
    min_rise: float = flag(
        tpo.swap.DEFAULT_MIN_RISE,
        "two-phase: no fall counts before the maximum is this multiple of the "
        "first reading (>= 1)",
        type=_checked(_peak, "min_rise"),
    )
    # the plateau's (tpo.swap.plateau),
    plateau_rtol: float = flag(
        tpo.swap.DEFAULT_RTOL,
        "two-phase, plateau rules: the relative fall of the smoothed epoch "
        "loss that counts as progress, in [0, 1)",
        type=_checked(tpo.swap.plateau, "rtol"),
    )
    plateau_patience: int = flag(
        tpo.swap.DEFAULT_PLATEAU_PATIENCE,
        "two-phase, plateau rules: epochs without progress before the swap",
        type=_checked(tpo.swap.plateau, "patience", int),
    )
    plateau_smoothing: float = flag(
        tpo.swap.DEFAULT_PLATEAU_SMOOTHING,
        "two-phase, plateau rules: weight of the newest epoch's mean loss in "
        "the moving average, in (0, 1]",
        type=_checked(tpo.swap.plateau, "smoothing"),
    )
    # and the fit rule's (tpo.swap.fitted): the most training examples an
    # epoch's steps may get wrong, and such epochs in a row before the swap.
    fit_errors: int = flag(
        tpo.swap.DEFAULT_MAX_ERRORS,
        "two-phase, fit rule: the most training examples an epoch may get "
        "wrong (0: all right)",
        type=_checked(tpo.swap.fitted, "max_errors", int),
    )
    fit_patience: int = flag(
        tpo.swap.DEFAULT_FIT_PATIENCE,
        "two-phase, fit rules: fitted epochs in a row before the swap",
        type=_checked(tpo.swap.fitted, "patience", int),
    )
    # Where the rule stops: by default not in the last fifth of --epochs.
    late_swap: bool = flag(
        False,
        "two-phase: let the rule swap in the last fifth of --epochs too (by "
        "default it does not, as tpo.swap.default(..., epochs=) and tpo.fit)",
        action="store_true",
    )

    def make(
        self, steps_per_epoch: int | None = None, epochs: int | None = None
    ) -> tpo.swap.SwapRule:
        """The ``tpo.swap`` rule, read once per epoch of ``steps_per_epoch``
        steps; ``None``: the rule without its window, for
        :func:`tpo.swap.replay` on per-epoch rows. Given the run's ``epochs``,
        no swap after :meth:`latest_swap` of them. The one place where the
        command line's rules become ``tpo.swap`` objects; the same settings
        give the same object, whose replay compiles once."""
        return _swap_rule(self, steps_per_epoch, epochs)

    def latest_swap(self, epochs: int) -> int:
        """The last epoch after which the rule may swap in a run of
        ``epochs``: ``tpo.swap.last_swap_epoch(epochs)`` as
        ``tpo.swap.default(..., epochs=)`` (none in the last fifth), or
        ``epochs`` with --late-swap."""
        return epochs if self.late_swap else tpo.swap.last_swap_epoch(epochs)


@functools.lru_cache(maxsize=32)
def _swap_rule(
    swap: SwapConfig, steps_per_epoch: int | None, epochs: int | None
) -> tpo.swap.SwapRule:
    peak = tpo.swap.peak(
        swap.gn_factor,
        smoothing=swap.smoothing,
        patience=swap.patience,
        min_rise=swap.min_rise,
    )
    plateau = tpo.swap.plateau(
        swap.plateau_rtol,
        patience=swap.plateau_patience,
        smoothing=swap.plateau_smoothing,
    )
    fitted = tpo.swap.fitted(swap.fit_errors, patience=swap.fit_patience)
    rule = {
        "peak": peak,
        "plateau": plateau,
        "peak-then-plateau": tpo.swap.after(peak, plateau),
        "fit": fitted,
        "fit-or-plateau": tpo.swap.any_of(fitted, plateau),
    }[swap.rule]
    if epochs is not None and swap.latest_swap(epochs) < epochs:
        rule = tpo.swap.within(rule, windows=swap.latest_swap(epochs))
    if steps_per_epoch is None:
        return rule
    return tpo.swap.per_window(rule, steps=steps_per_epoch)


@dataclasses.dataclass
class OptimizerConfig:
    """The variant (``name``, a key of :mod:`experiments.variants`) and its
    settings; :func:`make_optimizer` builds it."""

    name: str = flag("two-phase", choices=OPTIMIZERS, dest="optimizer")
    lr: float = flag(1e-3, type=cli.POSITIVE)
    swap_epoch: int = flag(30, "first CG epoch of two-phase-fixed", type=cli.integer(0))
    fallback: str | None = flag(
        None,
        "two-phase: after --max-failures failed line searches in a row, stay "
        "in CG ('none', the default) or return to Adam ('first')",
        choices=("none", "first"),
    )
    max_failures: int = flag(3, type=_checked(_two_phase, "max_failures", int))
    cg_batch_size: int | None = flag(
        None,
        "batch size of the CG phase (default: the whole training set)",
        type=cli.integer(1),
    )
    # CG and L-BFGS batches larger than this are evaluated in chunks of at most
    # this many images (twophase_optax.chunked_loss); 0: in one pass.
    cg_chunk_size: int = flag(
        DEFAULT_CG_CHUNK_SIZE,
        "CG and L-BFGS evaluate batches larger than this in chunks of at most "
        f"this many images, in bounded memory (default {DEFAULT_CG_CHUNK_SIZE}: "
        "at most 8 GiB for every model on MNIST and CIFAR); 0: in one pass",
        type=cli.integer(0),
    )
    swap: SwapConfig = dataclasses.field(default_factory=SwapConfig)

    @property
    def variant(self) -> variants.Variant:
        """``name``'s entry in :mod:`experiments.variants`."""
        return variants.get(self.name)


@dataclasses.dataclass
class RunConfig:
    """What is trained on what, for how long, and where it is written."""

    model: str = flag("vit-mlp", choices=models.MODEL_NAMES)
    dataset: str = flag("digits", choices=data_lib.DATASET_NAMES)
    loss: str = flag(
        models.DEFAULT_LOSS,
        "softmax_mse (default): MSE of the softmax outputs against one-hot "
        "targets; mse: MSE of the raw outputs; xent: cross-entropy",
        choices=tuple(models.LOSSES),
    )
    epochs: int = flag(100, type=cli.integer(1))
    batch_size: int = flag(512, type=cli.integer(1))
    seed: int = flag(0, type=int)
    out: str = flag("runs/digits/vit-mlp/two-phase", "default: runs/DATASET/MODEL/OPT")
    data_dir: str | None = flag(None, "TFDS data directory")
    resume: bool = flag(False, action="store_true")
    checkpoint_every: int = flag(
        1,
        "write the checkpoint that --resume continues from every N epochs "
        "(and after the last); a resumed run redoes the epochs after it. "
        "Raise it where writing a checkpoint costs more than an epoch",
        type=cli.integer(1),
    )
    progress: bool = flag(True, action="store_false", option="--no-progress")
    label: str = ""  # A prefix for the progress bar ("run 2/10: ").
    # Checkpoints kept for good (beside the last two) at these epochs, in
    # <out>/kept: the epochs a budget sweep starts its second phases from.
    keep_epochs: tuple[int, ...] = ()
    # Adam only: also keep the checkpoint of the epoch whose gradient-norm
    # reading makes the swap rule fire, found by tpo.swap.replay on the
    # readings so far.
    keep_detected: bool = False
    # Start from another run's kept checkpoint instead of from scratch: the
    # Adam run's directory and the epoch whose end state is taken; this run's
    # epochs from prefix_epoch + 1 on are its own (see Trainer.start_from).
    prefix_run: str | None = None
    prefix_epoch: int = -1


@dataclasses.dataclass
class MeshConfig:
    """The devices a run is spread over, and the hosts they belong to."""

    spec: str | None = flag(
        None,
        "device mesh 'data=N[,model=M]' (default: data-parallel over all "
        "devices); the model axis splits parameters along their last dimension",
        dest="mesh",
    )
    distributed: bool = flag(
        False,
        "multi-host: call jax.distributed.initialize() first (one process per "
        "host; see docs/scaling.md)",
        action="store_true",
    )
    coordinator: str | None = flag(
        None,
        "with --distributed: process 0's host:port (default: detected from the "
        "cluster environment, e.g. SLURM or a TPU pod)",
    )
    num_processes: int | None = flag(None, type=cli.integer(1))
    process_id: int | None = flag(None, type=cli.integer(0))


@dataclasses.dataclass
class ProbeConfig:
    """The curvature probe: the extreme Hessian eigenvalues on a fixed batch."""

    every: int = flag(
        0,
        "every N epochs record the smallest and largest Hessian eigenvalue of "
        "the loss on a fixed probe batch (Lanczos); 0: never",
        type=cli.integer(0),
        dest="curvature_every",
    )
    iterations: int = flag(
        20,
        "Lanczos steps (Hessian-vector products) per curvature probe",
        type=cli.integer(1),
        dest="curvature_iterations",
    )
    batch: int = flag(
        512,
        "images in the fixed curvature probe batch (the first N)",
        type=cli.integer(1),
        dest="curvature_batch",
    )


SECTIONS = {
    "run": RunConfig,
    "optimizer": OptimizerConfig,
    "mesh": MeshConfig,
    "probe": ProbeConfig,
}


@dataclasses.dataclass
class Config:
    """One training run: four sections (see the module's docstring)."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)

    @classmethod
    def of(cls, **settings: Any) -> Config:
        """A config from flat settings, named as the flags name them
        (``epochs``, ``optimizer``, ``swap_rule``, ``curvature_every``, ...);
        the rest keep their defaults.

        Example:
          >>> config = Config.of(model="vgg5", optimizer="adam", gn_factor=0.5)
          >>> config.run.model, config.optimizer.name, config.optimizer.swap.gn_factor
          ('vgg5', 'adam', 0.5)
        """
        paths = flat_names()
        if unknown := sorted(set(settings) - set(paths)):
            raise ValueError(f"Unknown setting(s) {unknown}; known: {sorted(paths)}.")
        sections = {name: {} for name in SECTIONS}
        swap = {}
        for name, value in settings.items():
            path = paths[name]
            target = swap if path[:2] == ("optimizer", "swap") else sections[path[0]]
            target[path[-1]] = value
        sections["optimizer"]["swap"] = SwapConfig(**swap)
        return cls(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})

    def flat(self) -> dict[str, Any]:
        """The settings by their flat names, the inverse of :meth:`of`."""
        return {name: self.get(path) for name, path in flat_names().items()}

    def get(self, path: tuple[str, ...]) -> Any:
        """The setting at ``path`` (``("optimizer", "swap", "rule")``)."""
        return functools.reduce(getattr, path, self)

    def validate(self) -> None:
        """Raises ``ValueError`` naming each setting out of its range.

        Each flag's type checks its own range (the library's factories for
        the swap rule's and the fallback's); what only the settings together
        decide is checked here.
        """
        problems = []
        for name, path, field in _flags():
            value = self.get(path)
            choices = field.metadata.get("choices")
            check = getattr(field.metadata.get("type"), "check", None)
            if value is None and field.default is None:
                continue
            if name == "fallback":
                choices = FALLBACKS
            if choices is not None and value not in choices:
                problems.append(f"{name} must be one of {choices}, got {value!r}")
            elif check is not None:
                try:
                    check(value)
                except ValueError as error:
                    problems.append(f"{name}: {error}")
        run, optimizer = self.run, self.optimizer
        variant = variants.REGISTRY.get(optimizer.name)  # None: reported above
        if (run.model in models.TEXT_VARIANTS) != (run.dataset in data_lib.TEXT_NAMES):
            problems.append(f"model {run.model!r} does not fit dataset {run.dataset!r}")
        if any(e < 0 for e in run.keep_epochs):
            problems.append(f"keep_epochs must be >= 0, got {run.keep_epochs}")
        if run.keep_detected and variant is not variants.ADAM:
            problems.append("keep_detected is for the adam variant only")
        if run.prefix_run is not None and not (
            variant is not None
            and variant.two_phases
            and 0 <= run.prefix_epoch < run.epochs
            and (variant.swap == "rule" or run.prefix_epoch + 1 == optimizer.swap_epoch)
        ):
            problems.append(
                f"prefix_epoch {run.prefix_epoch} of prefix_run {run.prefix_run!r} "
                f"does not start a second phase of {optimizer.name!r} within "
                f"{run.epochs} epochs"
            )
        if problems:
            raise ValueError("Invalid config: " + "; ".join(problems) + ".")


@functools.cache
def flat_names() -> dict[str, tuple[str, ...]]:
    """Each setting's flat name (its flag's, without dashes) and its path."""
    names = {}

    def walk(cls, path):
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(field.default_factory):
                walk(field.default_factory, (*path, field.name))
            else:
                names[field.metadata.get("dest", field.name)] = (*path, field.name)

    for section, cls in SECTIONS.items():
        walk(cls, (section,))
    return names


def _flags():
    """``(flat name, path, field)`` of every field that is a flag."""
    for name, path in flat_names().items():
        cls = SECTIONS[path[0]]
        for part in path[1:-1]:
            cls = {f.name: f for f in dataclasses.fields(cls)}[part].default_factory
        field = {f.name: f for f in dataclasses.fields(cls)}[path[-1]]
        if field.metadata.get("flag"):
            yield name, path, field


def make_optimizer(
    config: Config, adam_steps_per_epoch: int, mini_batch_cg: bool = False
):
    """The optax transformation for ``config.optimizer``.

    CG on mini-batches searches with values only and keeps the previous
    gradient: a gradient stored by the line search belongs to the last batch,
    and the next step, on another batch, could not use it.
    """
    optimizer = config.optimizer
    variant = optimizer.variant
    if variant.first == "adam-cosine":
        steps = config.run.epochs * adam_steps_per_epoch
        adam = optax.adam(optax.cosine_decay_schedule(optimizer.lr, steps))
    else:
        adam = optax.adam(optimizer.lr)
    if variant.second is None:
        return adam
    cg = tpo.conjugate_gradient(
        linesearch=tpo.slope_linesearch() if mini_batch_cg else None
    )
    if variant.first is None:
        return cg
    if variant.swap == "fixed" and not config.run.prefix_run:
        rule = tpo.swap.at_step(optimizer.swap_epoch * adam_steps_per_epoch)
    else:
        # A tail (prefix_run) starts in the second phase, where the rule plays
        # no part: with the detected swap's rule the tails of every budget
        # and the detected swap's are one program, compiled once.
        rule = optimizer.swap.make(
            adam_steps_per_epoch,
            None if config.run.prefix_run else config.run.epochs,
        )
    return tpo.two_phase(
        adam,
        optax.lbfgs() if variant.second == "lbfgs" else cg,
        swap=rule,
        fallback=optimizer.fallback,
        max_failures=optimizer.max_failures,
    )


def add_flag(parser: argparse.ArgumentParser, name: str, **override: Any) -> None:
    """Adds the flag of the setting ``name`` (a flat name of :meth:`Config.of`)
    to ``parser``, as ``python -m experiments.train`` has it; ``override``
    replaces parts of it (``default=``), for the scripts that share it."""
    for flat, _, field in _flags():  # noqa: B007 (the loop finds the field)
        if flat == name:
            break
    else:
        raise KeyError(name)
    argument = {
        k: v for k, v in field.metadata.items() if k not in ("flag", "dest", "option")
    }
    option = field.metadata.get("option", "--" + name.replace("_", "-"))
    if argument.get("action") is None:
        argument["default"] = field.default
    if name == "fallback":
        argument["default"] = "none"
    if not argument.get("help"):
        argument.pop("help", None)
    argument.update(override)
    parser.add_argument(option, dest=name, **argument)


def parse_args(argv: list[str] | None = None) -> Config:
    """The config that ``python -m experiments.train``'s flags describe."""
    parser = argparse.ArgumentParser(
        description="Trains one of the paper's models with Adam, two-phase or "
        "CG; resumable (see experiments/train.py)."
    )
    for name, _, _ in _flags():
        add_flag(parser, name, **({"default": None} if name == "out" else {}))
    parser.add_argument(
        "--paper-rule",
        action="store_true",
        help="two-phase: Algorithm 1 as printed (same as --swap-rule peak "
        "--gn-factor 0.9 --smoothing 1 --patience 1 --min-rise 1 --late-swap)",
    )
    args = vars(parser.parse_args(argv))
    check_model_fits_dataset(parser, args["model"], args["dataset"])
    args["fallback"] = None if args["fallback"] == "none" else args["fallback"]
    if args.pop("paper_rule"):
        args.update(PAPER_RULE)
    if args["out"] is None:
        args["out"] = f"runs/{args['dataset']}/{args['model']}/{args['optimizer']}"
    return Config.of(**args)


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
