"""Backbone adapters: how objectives, planner, exporter and fine-tuning reach a non-CNN network."""
