"""Offline evaluate metric module; the script is mcc.py (loadable with evaluate.load on this folder)."""
