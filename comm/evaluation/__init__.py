"""Evaluation: REC, POPE and caption readers and metrics, their runs with a model, sharding and resume, the scripts."""
