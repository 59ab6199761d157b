"""Offline evaluate metric module; the script is f1.py (loadable with evaluate.load on this folder)."""
