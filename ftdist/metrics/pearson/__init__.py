"""Offline evaluate metric module; the script is pearson.py (loadable with evaluate.load on this folder)."""
