"""The study's steps, one module per notebook, and the run folder they share."""
