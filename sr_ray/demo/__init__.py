"""Everything drawn in code for the demo: pictures' community, triplets, generations."""
