"""The validated, fully resolved spec (the IR) and how it is made from `.nl` text."""

from nlc.spec.lower import load_spec
from nlc.spec.schema import SpecFile

__all__ = ["SpecFile", "load_spec"]
