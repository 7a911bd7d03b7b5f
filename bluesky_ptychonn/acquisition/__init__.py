"""The simulated beamline as Bluesky sees it: ophyd stage and diffraction detector, and the fly-scan plan."""
