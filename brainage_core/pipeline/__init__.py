"""Running the study: papermill over the notebooks, and the book assembled from a run."""
