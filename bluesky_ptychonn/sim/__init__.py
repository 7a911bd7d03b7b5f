"""The physics simulator (objects, probes, scan paths, far-field diffraction with Poisson noise) and
the simulated samples, detector settings and fly trajectories of the simulated beamline.

Pure numpy and pydantic: no bluesky, ophyd or tiled.
"""
