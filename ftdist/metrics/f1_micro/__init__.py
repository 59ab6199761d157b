"""Offline evaluate metric module; the script is f1_micro.py (loadable with evaluate.load on this folder)."""
