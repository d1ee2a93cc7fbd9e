"""SOFT as a drop-in for any Flower app: ``soft_mod`` (ClientApp) and ``SoftDecode`` (server)."""

from fedsoft.dropin.keys import KeyMap, KeyMapError
from fedsoft.dropin.mod import soft_mod
from fedsoft.dropin.strategy import SoftDecode

__all__ = ["KeyMap", "KeyMapError", "SoftDecode", "soft_mod"]
