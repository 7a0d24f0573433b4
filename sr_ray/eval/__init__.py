"""Comparing reward models: scorers (one module per model, ``scorers/``), preference test sets and their
importers (``preference_sets``), the comparison job (``compare``, paper Tables 3-4), the T2I evaluation
(``t2i``, Tables 5-6); its statistics with confidence intervals are ``sr_ray.core.stats`` (the reward sweep uses them too)."""
