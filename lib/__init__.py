"""Skin lesion classification pipeline library."""
