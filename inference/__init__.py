"""Everyday jobs on a trained PanFoMa model: reference mapping (label transfer), in-silico perturbation, and gene
embeddings / attention export. Each module imports torch when used; this package imports nothing at import time,
so the command line's parser stays light."""
