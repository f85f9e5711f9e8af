#!/bin/sh
# Container entry point: scripts/serve.py foreground (PID 1 after exec) runs TorchServe as its child
# with a config generated from the repository's config.properties, and drains it on SIGTERM
# (readiness off, DRAIN_SECONDS of serving, then TorchServe stops). Environment:
#   BIND          listen address of the exposed APIs (the images set 0.0.0.0; default here 127.0.0.1)
#   EXPOSE        which APIs listen on BIND (default inference,metrics); management and gRPC
#                 management stay on loopback (probes and `make update` run inside the pod)
#   MODEL_STORE   folder holding all.mar (default: model_store next to this script's parent)
#   TOKEN_AUTH    "true" turns TorchServe's token authorisation on (keys in key_file.json)
#   INFERENCE_PORT MANAGEMENT_PORT METRICS_PORT GRPC_INFERENCE_PORT GRPC_MANAGEMENT_PORT
#   CONFIG_OUT    where the generated config is written (default /tmp/multidet-config.properties)
#   DRAIN_SECONDS serving after SIGTERM with readiness off (default 5); DRAIN_FILE the marker probe.py reads
#   FRONT         torchserve (default) or ray: the same model set on Ray Serve (scripts/serve_ray.py
#                 foreground: a one-node Ray cluster in the container, port RAY_PORT 8000, OPT and
#                 MODELS as the image was built with). Ray's GCS on loopback, token authentication on
#                 (RAY_AUTH_TOKEN from a secret, else one made in $HOME/.ray/auth_token): only the
#                 serve port is a way in. On KubeRay the operator starts Ray itself: deploy/k8s/rayservice.yaml
set -eu
APP=$(cd "$(dirname "$0")/.." && pwd)
cd "$APP"
if [ "${FRONT:-torchserve}" = "ray" ]; then
    exec python scripts/serve_ray.py foreground --bind "${BIND:-127.0.0.1}" --port "${RAY_PORT:-8000}" \
        --model-set "${MODELS:-$APP/models.yaml}" --optimization "${OPT:-auto}" --set "artifact_dir=$APP/artifacts/ray"
fi
set -- foreground --bind "${BIND:-127.0.0.1}" --expose "${EXPOSE:-inference,metrics}" \
    --model-store "${MODEL_STORE:-$APP/model_store}" \
    --write-config "${CONFIG_OUT:-/tmp/multidet-config.properties}"
if [ "${TOKEN_AUTH:-false}" = "true" ]; then
    set -- "$@" --secure
fi
[ -n "${INFERENCE_PORT:-}" ] && set -- "$@" --port "inference=$INFERENCE_PORT"
[ -n "${MANAGEMENT_PORT:-}" ] && set -- "$@" --port "management=$MANAGEMENT_PORT"
[ -n "${METRICS_PORT:-}" ] && set -- "$@" --port "metrics=$METRICS_PORT"
[ -n "${GRPC_INFERENCE_PORT:-}" ] && set -- "$@" --port "grpc_inference=$GRPC_INFERENCE_PORT"
[ -n "${GRPC_MANAGEMENT_PORT:-}" ] && set -- "$@" --port "grpc_management=$GRPC_MANAGEMENT_PORT"
exec python scripts/serve.py "$@"
