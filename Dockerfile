# ws-gateway: the WebSocket gateway for the chat auth migration.
#
#   docker build -t ws-gateway .
#   docker run -p 8080:8080 -p 9090:9090 --stop-timeout 45 -e JWT_SECRET=... \
#     -v "$PWD/config/gateway.yaml:/etc/ws-gateway/gateway.yaml:ro" ws-gateway
#
# Config: mount it read-only at /etc/ws-gateway/gateway.yaml (GATEWAY_CONFIG below).
# No config is baked in, on purpose: without the mount `serve` exits 2 with one line
# naming that path, instead of starting against example backends. Relative paths in it
# (auth.public_key_file) resolve from /etc/ws-gateway/, so mount a key file next to it.
# Secrets come from the environment (`secret: ${JWT_SECRET}`), never from the image.
# listen.host must be 0.0.0.0 (as in config/gateway.yaml) to be reachable from outside.
#
# Stopping: SIGTERM starts the drain (drain.grace_seconds, then sessions closed over
# drain.window_seconds). Give the container at least their sum plus a margin before
# SIGKILL: `docker run --stop-timeout`, or terminationGracePeriodSeconds on Kubernetes
# (Docker's default is 10 s).
#
# Health: /healthz and /readyz are on the admin listener (admin: {host: 0.0.0.0, port:
# 9090} in config/gateway.yaml). Point the orchestrator's probes there; the HEALTHCHECK
# below asks /healthz with the interpreter the image already has.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/ws-gateway \
    PATH=/opt/ws-gateway/bin:$PATH \
    GATEWAY_CONFIG=/etc/ws-gateway/gateway.yaml

# A dedicated virtualenv, owned by root and read-only to the service user. Only what the
# package build needs is copied (pyproject names README.md as the long description).
COPY pyproject.toml README.md /tmp/build/
COPY gateway /tmp/build/gateway
RUN python -m venv "$VIRTUAL_ENV" \
 && pip install /tmp/build \
 && rm -rf /tmp/build \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/ws-gateway

WORKDIR /etc/ws-gateway
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

EXPOSE 8080 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["ws-gateway", "serve"]
