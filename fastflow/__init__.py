"""fastflow: fast, correct training and sampling for DDPM, DDIM, Flow Matching and Flow Map Matching."""

__version__ = "0.1.0"
