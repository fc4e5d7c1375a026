"""Data shipped inside the package: the embedded tiny pipeline (scripts/build_tiny_pipeline.py makes it)."""
from pathlib import Path

TINY_PIPELINE = Path(__file__).resolve().parent / "tiny_pipeline"
