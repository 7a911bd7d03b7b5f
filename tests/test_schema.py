"""The start-document schema: one writer, one validating reader, used by plan, callback, replay and training."""

import numpy as np
import pytest

from bluesky_ptychonn import schema
from bluesky_ptychonn.core.config import DetectorGeometry
from bluesky_ptychonn.core.geometry import GRID_MARGIN_PIXELS, ObjectGrid
from bluesky_ptychonn.errors import RunError
from bluesky_ptychonn.sim.sample import DetectorSettings, FlyScan, FlyTrajectory, SimulatedSample

GEOMETRY = DetectorGeometry(frame_pixels=32)
DATASETS = {
    "diffraction": "/entry/data/data",
    "positions_m": "/entry/data/positions_m",
    "frame_id": "/entry/data/frame_id",
}


@pytest.fixture(scope="module")
def start():
    sample = SimulatedSample.for_geometry("schema-test", GEOMETRY, seed=1, shape_px=(128, 128))
    trajectory = FlyTrajectory("snake", (3, 4), 2e-7, (1e-7, -2e-7), 1e-3, 1e-3)
    scan = FlyScan(trajectory=trajectory, settings=DetectorSettings(geometry=GEOMETRY), sample=sample)
    return {"uid": "abc", "plan_name": "ptycho_fly_scan", schema.SECTION: schema.ptychography_metadata(scan, DATASETS)}


def test_written_section_reads_back(start):
    section = schema.read_section(start)
    assert section["version"] == schema.VERSION
    assert schema.geometry(section) == GEOMETRY
    assert schema.data_keys(section) == schema.DATA_KEYS and schema.stream_name(section) == "primary"
    positions = schema.nominal_positions(section)
    assert positions.shape == (12, 2) and np.allclose(positions.mean(axis=0), (1e-7, -2e-7))
    probe = schema.probe(section)
    assert probe.shape == (32, 32) and np.isclose(np.sum(np.abs(probe) ** 2), 1, rtol=1e-5)
    assert section["simulation_truth"]["tiled_path"] == "simulation_truth/schema-test"


def test_object_grid_is_the_declared_region_or_covers_the_scan(start):
    section = schema.read_section(start)
    pixel = GEOMETRY.pixel_size_m()
    assert schema.object_grid(section, pixel, 32) == ObjectGrid.from_metadata(section["region_grid"])
    # Another pixel size (binned frames): a grid that covers the declared scan extent and its margin.
    grid = schema.object_grid(section, 2 * pixel, 16)
    corners = grid.patch_corners(schema.nominal_positions(section), 16)
    assert corners.min() >= GRID_MARGIN_PIXELS - 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({schema.SECTION: None}, "not a ptychography run"),
        ({"version": 99}, "version 99 is not 1"),
        ({"distance_m": None}, r"lacks \['distance_m'\]"),
        ({"scan": None}, r"lacks \['scan'\]"),
    ],
)
def test_bad_sections_are_refused_with_the_reason(start, change, message):
    section = dict(start[schema.SECTION])
    if schema.SECTION in change:
        doc = {k: v for k, v in start.items() if k != schema.SECTION}
    else:
        for key, value in change.items():
            if value is None:
                section.pop(key)
            else:
                section[key] = value
        doc = {**start, schema.SECTION: section}
    with pytest.raises(RunError, match=message):
        schema.read_section(doc)
