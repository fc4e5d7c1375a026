"""Layers built from dalle3_fast.ops."""
