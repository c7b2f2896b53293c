"""conure_dist: continual user representation learning without forgetting (Conure), at scale."""

__version__ = "0.1.0"
