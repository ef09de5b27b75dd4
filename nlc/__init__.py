"""nlc: a compiler for Nested Learning architectures."""

__version__ = "0.1.0"
