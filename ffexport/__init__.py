"""ffexport: export, quantize, verify and benchmark FeatherFace face detectors."""
__version__ = "0.3.0"
