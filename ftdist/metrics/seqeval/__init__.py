"""Offline evaluate metric module; the script is seqeval.py (loadable with evaluate.load on this folder)."""
