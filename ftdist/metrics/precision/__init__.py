"""Offline evaluate metric module; the script is precision.py (loadable with evaluate.load on this folder)."""
