"""The archive side: Tiled servers, archived runs and their selection, replay, labels and training from
runs, and the model registry. Nothing here imports ophyd or the acquisition layer.
"""
