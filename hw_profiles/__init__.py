"""Registry of deployment targets: supported bit widths, scale formats and default budgets.

One TOML file per target lives next to this module (documented in ``schema.md``); users pass the
path of their own file wherever a profile name is accepted.
"""

from .loader import (
    PROFILE_DIR,
    describe_profile,
    list_profiles,
    load_profile,
    load_profile_file,
    parse_profile,
    profile_names,
)
from .profile import LAYER_KINDS, BitChoices, HardwareProfile

__all__ = [
    "LAYER_KINDS",
    "PROFILE_DIR",
    "BitChoices",
    "HardwareProfile",
    "describe_profile",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "parse_profile",
    "profile_names",
]
