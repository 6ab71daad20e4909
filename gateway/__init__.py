"""WebSocket gateway for moving chat clients from URL-token auth to message auth."""
