"""Offline evaluate metric module; the script is accuracy.py (loadable with evaluate.load on this folder)."""
