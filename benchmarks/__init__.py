"""napari-magnet benchmarks: ``make bench`` runs :mod:`benchmarks.run`."""
