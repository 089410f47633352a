"""Shipped SSL planning defaults, as data.

``profiles.json``: the network presets of the CPU profiles (METHODS.md §9).
``method_defaults.json``: per profile and method, training settings and layout constants that the planner
merges into ``sslPlans.json``. Edit the written plan (not these files) to change one dataset's run.
"""
import json
import os

PLANS_DIR = os.path.dirname(os.path.abspath(__file__))


def load_shipped(name: str) -> dict:
    with open(os.path.join(PLANS_DIR, name)) as f:
        return json.load(f)
