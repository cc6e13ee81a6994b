"""``aam-fast compare``'s settings: train-rm's (:class:`RMConfig`, the same flags where they apply) plus the
variants to train, the eval sets and the statistics; and the variants it expands to."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ....losses import MARGINS, NAMED_GAMMA, margin_needs
from ....training.config import TrainingConfig, option
from ..config import RMConfig


@dataclasses.dataclass(kw_only=True)
class CompareConfig(RMConfig):
    """Every setting of a ``compare`` run. train-rm's flags keep their meaning; ``--margin`` is replaced by
    ``--margins`` (and the sweeps). With ``--trainable-layers`` and no LoRA the frozen trunk is cached; otherwise
    (full fine-tuning, or LoRA) every variant trains the whole model, one after another (:attr:`caches_trunk`)."""

    output: str = option(
        help="the comparison's folder: OUTPUT/<variant>/ (each as train-rm writes it), compare.json, compare.md and "
        "compare.png",
        group="output",
    )
    eval_data: list[str] | None = option(
        None, help="held-out preference files, each one eval set (default: a prompt-hash split of --data)", group="data"
    )
    margins: list[str] = option(
        help="the margins to train side by side; bt (when listed) is the baseline of the paired tests",
        choices=MARGINS,
        factory=lambda: ["bt", "pr", "ld"],
        group="compare",
    )
    betas: list[float] | None = option(
        None,
        help="sweep the AAM margin's scale: one pr/ld variant per value (default: --beta)",
        minimum=0.0,
        group="compare",
    )
    gammas: list[float] | None = option(
        None,
        help="sweep the reference weight: one pr/ld variant per value (pr and ld differ only in their default "
        "gamma, so a sweep usually lists one of them)",
        group="compare",
    )
    sft_weights: list[float] | None = option(
        None,
        help="sweep the weight of the SFT term on the chosen response: one variant of every margin per value "
        "(default: --sft-weight)",
        minimum=0.0,
        group="compare",
    )
    bootstrap: int = option(
        2000,
        help="paired-bootstrap resamples of the pairs for the 95%% intervals (at most 100000: the resamples' pair "
        "indices are held at once, resamples x pairs integers)",
        minimum=100,
        maximum=100_000,
        group="compare",
    )
    trunk_memory_gb: float = option(
        8.0,
        help="refuse to start when the cached trunk would exceed this in memory (without --trunk-dir): it holds "
        "every sequence's trunk output, (tokens of all train and eval sequences) x hidden size x 4 bytes (2 under "
        "bfloat16), e.g. SmolLM2-135M (hidden 576), 1,000 pairs of 300 tokens: 1.4 GB",
        above=0.0,
        group="compare",
    )
    trunk_dir: str | None = option(
        None,
        help="keep the cached trunk in memory-mapped files in this folder instead of memory (for trunks over "
        "--trunk-memory-gb; the files are unlinked at once, the OS pages them in as batches need them)",
        group="compare",
    )
    json: bool = option(False, help="print the report as one JSON object on stdout", group="output")

    trainable_layers: int | None = option(
        None,
        help="train only the top K decoder layers, the final norm and the score head of every variant; without "
        "--lora-r the trunk below them runs once per sequence (the fast path); unset: full fine-tuning (or LoRA on "
        "every layer), each variant trained in turn from the same initial weights",
        minimum=1,
        group="model",
    )

    # train-rm settings compare fixes: one margin per variant, the cached trunk, no packing, no resume, one process.
    margin: str = "bt"
    strategy: str = "ddp"
    cache_trunk: bool = True
    packing: bool = False
    resume: str | None = None
    eval_every: int = 0

    def validate(self) -> None:
        TrainingConfig.validate(self)
        if not self.margins:
            raise ValueError("--margins needs at least one margin")
        if len(set(self.margins)) != len(self.margins):
            raise ValueError(f"--margins lists a margin twice: {' '.join(self.margins)}")
        aam = [m for m in self.margins if m in NAMED_GAMMA]
        if self.sft_weights is not None and len(set(self.sft_weights)) != len(self.sft_weights):
            raise ValueError("--sft-weights lists a value twice")
        for flag, values in (("--betas", self.betas), ("--gammas", self.gammas)):
            if values is not None and not aam:
                raise ValueError(f"{flag} sweeps pr or ld; --margins lists neither")
            if values is not None and len(set(values)) != len(values):
                raise ValueError(f"{flag} lists a value twice")
        names = [variant.name for variant in expand_variants(self)]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(
                f"--betas/--gammas: two variants would both be named {twice[0]} (one folder, one report row): their "
                "values agree to the 6 significant digits a name shows; drop one or make them differ more"
            )
        for variant in expand_variants(self):
            variant_config(self, variant).validate()

    @property
    def caches_trunk(self) -> bool:
        """Whether the frozen trunk below ``--trainable-layers`` is run once and cached (no LoRA); otherwise each
        variant trains the whole model (or its LoRA adapters) in turn."""
        return self.trainable_layers is not None and not self.lora_r


@dataclass(frozen=True)
class Variant:
    """One trained model of a comparison: its margin, scale, reference weight and SFT weight, and its folder
    name."""

    name: str
    margin: str
    beta: float
    gamma: float | None
    sft_weight: float

    @property
    def effective_gamma(self) -> float | None:
        """The reference weight the loss uses (the margin's named default unless set), None for bt and fixed."""
        if self.margin not in NAMED_GAMMA:
            return None
        return margin_needs(self.margin, gamma=self.gamma).gamma


def variant_name(margin: str, beta: float, gamma: float | None, sft_weight: float, cfg: CompareConfig) -> str:
    """A variant's name (its folder and report key): the margin, with ``-beta<b>`` / ``-gamma<g>`` / ``-sft<w>``
    for each setting that is swept and applies to it (beta and gamma are None for bt and fixed). The one place
    names are made."""
    swept = (("beta", cfg.betas, beta), ("gamma", cfg.gammas, gamma), ("sft", cfg.sft_weights, sft_weight))
    return margin + "".join(f"-{label}{value:g}" for label, values, value in swept if values and value is not None)


def expand_variants(cfg: CompareConfig) -> list[Variant]:
    """One variant per listed margin, per (beta, gamma) of the sweeps for pr and ld, and per SFT weight of
    ``--sft-weights`` for every margin, in the order listed (named by :func:`variant_name`)."""
    variants = []
    for margin in cfg.margins:
        aam = margin in NAMED_GAMMA
        settings = [(beta, gamma) for beta in cfg.betas or [cfg.beta] for gamma in cfg.gammas or [cfg.gamma]]
        for beta, gamma in settings if aam else [(cfg.beta, None)]:
            for sft in cfg.sft_weights or [cfg.sft_weight]:
                name = variant_name(margin, beta if aam else None, gamma, sft, cfg)
                variants.append(Variant(name, margin, beta, gamma, sft))
    return variants


def variant_config(cfg: CompareConfig, variant: Variant) -> RMConfig:
    """The train-rm settings of ``variant``: every shared setting of ``cfg``, its margin, beta, gamma and SFT weight,
    the cached trunk where ``cfg`` caches it, and ``OUTPUT/<variant>`` as its output folder."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RMConfig)}
    values.update(
        margin=variant.margin,
        beta=variant.beta,
        gamma=variant.gamma,
        sft_weight=variant.sft_weight,
        output=str(Path(cfg.output) / variant.name),
        eval_data=None,
        dev_fraction=0.0 if cfg.eval_data else cfg.dev_fraction,
        cache_trunk=cfg.caches_trunk,
        packing=False,
        resume=None,
        eval_every=0,
    )
    return RMConfig(**values)
