"""Demo material: small synthetic data sets that show what swapping a retrieval database does."""
