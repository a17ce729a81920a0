"""dlsr_search: the DLSR supernet, the differentiable search and the retrain trainer.

Depends on `dlsr_infer` (ops, ESA, cell, genotype, weights format); never the reverse.
"""
