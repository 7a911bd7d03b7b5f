"""The README's `show` figures: one run's live, replayed and refined results, rendered from Tiled by the CLI.

An embedded Tiled server, a 20x20 simulated fly scan with the live callback (the shipped base model),
then the same commands a user types, pointed at that server by ``TILED_URI``::

    bluesky-ptychonn show <uid>                          # the live result
    bluesky-ptychonn replay <uid> --checkpoint default-64 && bluesky-ptychonn show <uid>
    bluesky-ptychonn refine <uid> && bluesky-ptychonn show <uid>

    python examples/show_results.py [--out examples/figures]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    args = parser.parse_args()

    from bluesky import RunEngine

    from bluesky_ptychonn.acquisition.devices import PtychoDetector, SimStage
    from bluesky_ptychonn.acquisition.plans import ptycho_fly_scan
    from bluesky_ptychonn.archive.servers import start_embedded_server, subscribe_all
    from bluesky_ptychonn.cli import main as cli
    from bluesky_ptychonn.core.base_model import base_model_path
    from bluesky_ptychonn.live.callback import PtychoNNCallback

    with tempfile.TemporaryDirectory() as tmp:
        archive = start_embedded_server(Path(tmp) / "data", directory=Path(tmp) / "tiled")
        try:
            run_engine = RunEngine({})
            callback = PtychoNNCallback.from_checkpoint(
                base_model_path(), archive.client, data_roots=[archive.data_dir]
            )
            subscribe_all(run_engine, archive.client, callback, backup_directory=Path(tmp) / "backup")
            stage = SimStage(name="stage")
            detector = PtychoDetector(name="ptycho", stage=stage, data_dir=archive.data_dir, sample="sim-features-1")
            (uid,) = run_engine(ptycho_fly_scan(detector, stage, step_m=6.07e-7, shape=(20, 20)))
            assert callback.wait(uid, 600)
            os.environ["TILED_URI"] = archive.server.uri.split("?")[0]
            os.environ["TILED_API_KEY"] = archive.server.api_key
            args.out.mkdir(parents=True, exist_ok=True)
            show = ["show", uid, "--result", "ptychonn", "--out"]
            assert cli([*show, str(args.out / "show_live.png")]) == 0
            assert cli(["replay", uid, "--checkpoint", "default-64"]) == 0
            assert cli([*show, str(args.out / "show_replayed.png")]) == 0
            assert cli(["refine", uid]) == 0
            assert cli(["show", uid, "--out", str(args.out / "show_refined.png")]) == 0
        finally:
            archive.close()


if __name__ == "__main__":
    main()
