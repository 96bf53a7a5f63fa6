#!/bin/bash
# Docker HEALTHCHECK of the llmapi images: GET /health on 127.0.0.1:$LLMAPI_HEALTH_PORT
# (default 8000, the default --port of llmapi-launch serve and llmapi-router) and succeed on a
# 200. Plain HTTP through bash's /dev/tcp, so the image needs no curl; a server started with
# --ssl_certfile needs a probe that speaks TLS instead (Kubernetes' httpGet with scheme HTTPS).
set -euo pipefail
port=${LLMAPI_HEALTH_PORT:-8000}
exec 3<>"/dev/tcp/127.0.0.1/${port}"
printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
read -r -t 5 status_line <&3
case "$status_line" in
  "HTTP/1."?" 200"*) exit 0 ;;
  *) echo "/health on port ${port}: ${status_line:-no answer}" >&2; exit 1 ;;
esac
