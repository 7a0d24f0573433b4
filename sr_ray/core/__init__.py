"""The ground floor every stage builds on: errors, Parquet input, run and output identity."""
