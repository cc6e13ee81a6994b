"""``aam-fast compare``: reward-model variants trained side by side (:mod:`.run`) on one cached trunk or, when the
whole model trains, one shared model (:mod:`.shared_model`); their settings (:mod:`.config`), the shared inputs
(:mod:`.inputs`), the statistics (:mod:`.stats`) and the report (:mod:`.report`)."""

from .config import CompareConfig, Variant, expand_variants, variant_config
from .report import format_markdown
from .run import run_compare

__all__ = ["CompareConfig", "Variant", "expand_variants", "format_markdown", "run_compare", "variant_config"]
