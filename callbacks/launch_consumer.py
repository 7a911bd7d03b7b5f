"""Start the out-of-process PtychoNN consumer with the configuration beside this file.

Run it on the analysis machine next to a ``bluesky-0MQ-proxy``::

    TILED_API_KEY=... python callbacks/launch_consumer.py [--config other.toml]

The RunEngine side publishes with msgpack (``ipython_publisher.py``); pickled messages are dropped.
The API key comes from the environment only, never from the file or the command line.
"""

import sys
from pathlib import Path

from bluesky_ptychonn.cli import main

if __name__ == "__main__":
    default = ["--config", str(Path(__file__).with_name("ptychonn.toml"))]
    sys.exit(main(["consume", *(sys.argv[1:] or default)]))
