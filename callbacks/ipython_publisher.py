"""IPython startup snippet for a beamline profile: publish the RunEngine's documents to the 0MQ proxy.

The out-of-process consumer (``launch_consumer.py``) reads them on the proxy's other side.
Documents travel as msgpack (:mod:`bluesky_ptychonn.live.wire`), never as bluesky's default
pickle, which would let anyone who reaches the proxy run code in the consumer; the consumer drops
pickled messages. Copy into ``~/.ipython/profile_<beamline>/startup/`` after the file that creates
``RE``. The proxy's input address is ``[zmq] publish_address`` of the same TOML file as the
consumer (``PTYCHONN_CONFIG``, else ``ptychonn.toml`` beside this file).
"""

import os
from pathlib import Path

from bluesky.callbacks.zmq import Publisher

from bluesky_ptychonn.live.service import load_config
from bluesky_ptychonn.live.wire import serialize

_zmq = load_config(os.environ.get("PTYCHONN_CONFIG", Path(__file__).with_name("ptychonn.toml"))).zmq
ptychonn_publisher = Publisher(_zmq.publish_address, prefix=_zmq.prefix.encode(), serializer=serialize)
ptychonn_publisher_token = RE.subscribe(ptychonn_publisher)  # noqa: F821 (RE comes from the profile)
