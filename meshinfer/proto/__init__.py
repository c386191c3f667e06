"""Sans-I/O protocol cores: no asyncio, no sockets, no clock or random reads.

Time (``now``) and randomness (``random.Random``) are passed in by the caller.
"""
