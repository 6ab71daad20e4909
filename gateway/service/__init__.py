"""The service: one running gateway process and what operators see of it.

The composition root and the drain (`server.RunningGateway`, `serve`), the gateway its
connections report to (`runtime.Gateway`, composed of `rolloutstate`, `guardsync`,
`rebalancer` and `registry`), hot reload (`reload`, `configfile`), JWK sets (`jwks`), shared
state (`store/`), usage by app version (`appversion`) and its report (`report`), metrics,
logs, the admin port and its status page (`admin`, `metrics`, `logs`, `status_page`,
`status_assets`), and several workers on one port (`workers`, `reserve`).

May import: the core, the wire, and itself. Never the staging tools.
"""
