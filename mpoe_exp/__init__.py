"""mpoe-exp: reproduce and extend MPOE (Gao et al., COLING 2022) from Hydra configs."""

from mpoe_exp.config import compose_config
from mpoe_exp.errors import UserError
from mpoe_exp.models import build_model, load_model, save_model

__version__ = "0.1.0"
__all__ = ["UserError", "build_model", "compose_config", "load_model", "save_model"]
