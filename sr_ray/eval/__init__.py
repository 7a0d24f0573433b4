"""Comparing reward models: statistics with confidence intervals (more of issue 14 to come here)."""
