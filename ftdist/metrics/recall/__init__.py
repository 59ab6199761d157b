"""Offline evaluate metric module; the script is recall.py (loadable with evaluate.load on this folder)."""
