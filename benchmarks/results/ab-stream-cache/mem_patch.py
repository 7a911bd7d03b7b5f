"""Scratch harness: RSS over 200 publishes with tiled's streaming cache (argv: publishes, tiled|shipped)."""
import runpy, sys
sys.path.insert(0, "/work/main")
from bluesky_ptychonn.archive import servers
from tiled.server.streaming import StreamingCache
MODE = sys.argv[2]
orig = servers.start_embedded_server
def patched(*a, **k):
    arch = orig(*a, **k)
    ctx = arch.server.catalog.context
    print("cache config", {k: v for k, v in ctx.cache_config.items() if k in ("datastore", "data_ttl", "seq_ttl", "maxsize")})
    if MODE == "tiled":  # tiled's own: 1,000 entries, an hour
        ctx.streaming_cache = StreamingCache(ctx.cache_config)
    print("datastore ttl", ctx.streaming_cache._datastore._data_cache.ttl, "maxsize", ctx.streaming_cache._datastore._data_cache.maxsize)
    return arch
servers.start_embedded_server = patched
MODE = sys.argv[2]; sys.argv = [sys.argv[0], sys.argv[1]]
runpy.run_path(str(__import__("pathlib").Path(__file__).with_name("mem_stream.py")), run_name="__main__")
