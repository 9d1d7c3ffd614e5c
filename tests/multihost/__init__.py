"""Tests on a real multi-host network: Linux namespaces standing in for machines (hosts.py)."""
