"""WebSocket gateway for moving chat clients from URL-token auth to message auth.

Words used the same way in every module:

* **connection** — one client TCP connection from its 101 until both sockets are closed
  (`connection.Connection`); it exists whether or not it ever authenticates.
* **session** — what a connection carries once its token is verified: one user, one
  backend, one upstream socket, one translation between auth styles
  (`protocol.Session` is its state machine). Metrics and logs count sessions.
* **slot** — a user's share of ``limits.max_sessions_per_user``, taken from the store
  before the upstream is opened and given back when the connection ends.
* **leg** — one of a connection's two sockets: the client's or the upstream's.
"""
