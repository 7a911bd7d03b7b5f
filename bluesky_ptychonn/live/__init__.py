"""The live path: the Bluesky document callback, the Tiled sink, and the out-of-process 0MQ consumer."""
