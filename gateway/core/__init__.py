"""The session core: what the gateway decides, with no I/O and no clock of its own.

The session machine from the upgrade to the last close (`protocol` for the handshake and
the 2×2 translation table, `relayrules` for the relay phase), the close codes and what a
peer can get wrong about them (`closecodes`), token checks (`auth`), the user's backend
(`routing`), the config model and its pure parser (`config`, `configparse`), the rollback
guard (`guard`), the rebalance schedule (`rebalance`) and the client address behind trusted
proxies (`clientip`). Events and values in, actions and values out; tests drive it without
sockets.

May import: the standard library, pyjwt, and itself. Nothing here imports the wire, the
service or the staging tools.
"""
