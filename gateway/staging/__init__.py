"""Staging tools around the gateway, for QA and rehearsals: never part of a serving path.

The stub backends (`stub_backend`), the smoke-test probe (`probe`), the migration drill
(`drill`, with its pure plan and verdict in `drill_plan`) and the self-contained demo
(`demo`).

May import: everything below it. Nothing in the core, the wire or the service imports these.
"""
