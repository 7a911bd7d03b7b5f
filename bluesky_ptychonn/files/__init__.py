"""Files: HDF5 scan files, result files, training sets from files, PNG figures, and readers of the
frames documents point to (only inside configured data roots).

No bluesky, event-model, ophyd or tiled here.
"""
