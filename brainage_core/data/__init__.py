"""The data layer: from a data source to a prepared cohort on the template grid.

The MNI152 template and atlas, the data sources (BIDS, CSV, OASIS) and the synthetic
cohort, one preprocessing path, the on-disk array cache, splits and the torch datasets."""
