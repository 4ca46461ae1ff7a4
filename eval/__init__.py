"""Evaluation helpers for agentsd: the procedural captioned-shape data and the adherence scorer."""
