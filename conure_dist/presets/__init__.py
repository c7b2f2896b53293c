"""Shipped run configs (YAML): ``conure-dist config show NAME`` prints one to copy and edit."""
