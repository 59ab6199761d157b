"""Offline evaluate metric module; the script is spearman.py (loadable with evaluate.load on this folder)."""
