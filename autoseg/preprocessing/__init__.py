"""Preprocessing: crop, normalise and resample cases exactly as planned, and the inverse."""
