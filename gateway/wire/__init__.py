"""The wire: bytes in and out of sockets, fast and strict, with no policy of its own.

The client's request head (`handshake`, on aiohttp's llhttp parser), RFC 6455 framing
(`frames`) and RFC 7692 negotiation (`deflate`), the byte relay's frame checker (`forwarder`),
the two sockets of a connection and the pumps between them (`relay`), the shell that feeds
a session its events and performs its actions (`connection`, with `prerelay` for the frames
read before the relay, `upstream` for opening the backend's socket, `connlog` for its log
record), the upstream connector (`connector`), the public listener (`listener`) and the seam
to the gateway a connection belongs to (`services`, a Protocol).

May import: the core, aiohttp's protocol pieces, and itself. Never the service (it reaches
the running gateway only through `services.GatewayServices`) nor the staging tools.
"""
