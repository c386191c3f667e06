"""meshinfer: an asyncio peer-to-peer mesh runtime for distributed inference across vehicles."""

__version__ = "0.1.0"

#: Wire protocol version, bound into every Noise prologue and exchanged in the handshake payload.
PROTOCOL_VERSION = 1
