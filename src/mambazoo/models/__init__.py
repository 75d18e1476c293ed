"""Model families; importing a module registers its models in timm's registry."""
from . import mambavision
from . import plainmamba
from . import spatialmamba
from . import vim

__all__ = ["mambavision", "plainmamba", "spatialmamba", "vim"]
