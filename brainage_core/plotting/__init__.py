"""Figures of the study: static (matplotlib/nilearn) and interactive (plotly).

Submodules, imported on demand so that one figure's dependencies never break another:

``brainage_core.plotting.data``
    The synthetic cohort: subjects of different ages beside the template.
``brainage_core.plotting.prediction``
    Predicted against chronological age, the brain-age gap (raw and bias-corrected).
``brainage_core.plotting.maps``
    Importance maps: static nilearn views, per-method comparisons.
``brainage_core.plotting.interactive``
    Plotly set-up for the book (:func:`~brainage_core.plotting.interactive.setup_plotly`),
    the slice viewer of a map over the template.
"""
