"""Data sources: each turns a dataset into one manifest (participant, path, age, sex, site)."""
