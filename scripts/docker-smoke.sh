#!/usr/bin/env bash
# Smoke test of the Docker image: builds it, starts it with compose on the CPU (compose.yaml +
# compose.cpu.yaml), waits for /readyz and the container's health check, segments a generated image
# through /v1/predict with every model and by upload id, checks the masks (HTTP 200, a PNG of the image's
# size whose values are class ids of the model) and tears everything down, the uploads volume included.
#
#   scripts/docker-smoke.sh
#
# Needs Docker, a compose client and curl; the image and the mask are made and read by Python inside the
# container. It runs as its own compose project (unetseg-smoke), so a running unetseg stack and its
# uploads are left alone. Environment:
#   COMPOSE             compose command (default: "docker compose", else "docker-compose")
#   UNETSEG_IMAGE       image to build and run (default: unetseg)
#   UNETSEG_PORT        host port to publish (default: 8000)
#   DOCKER_BUILD_FLAGS  extra flags for docker build (e.g. --build-arg BASE_IMAGE=python:3.11-slim)
#   SKIP_BUILD=1        run the image as it is, without building it
#   READY_TIMEOUT       seconds to wait for the models to be ready (default: 600)
set -euo pipefail
cd "$(dirname "$0")/.."

image=${UNETSEG_IMAGE:-unetseg}
port=${UNETSEG_PORT:-8000}
export UNETSEG_IMAGE=$image UNETSEG_PORT=$port
project=unetseg-smoke
base=http://127.0.0.1:$port
ready_timeout=${READY_TIMEOUT:-600}

log() { echo "docker-smoke: $*" >&2; }
fail() {
  log "FAILED: $*"
  exit 1
}

if [ -z "${COMPOSE:-}" ]; then
  if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi
fi
read -r -a compose_cmd <<<"$COMPOSE"
compose_version=$("${compose_cmd[@]}" version --short 2>/dev/null) || fail "no compose client: $COMPOSE"
command -v curl >/dev/null || fail "curl is needed"

tmp=$(mktemp -d)
files=(-f compose.yaml -f compose.cpu.yaml)
compose_major=${compose_version#v}
compose_major=${compose_major%%.*}
if [ "$compose_major" = 1 ]; then
  # Compose v1 reads no `!reset` tag and merges device reservations, so no override can drop the GPU:
  # apply compose.cpu.yaml to compose.yaml here (mappings merge, `!reset` removes, other values replace).
  python3 -c 'import yaml' 2>/dev/null || fail "Compose v1 needs python3 with PyYAML here (or use Compose v2.24+)"
  python3 - compose.yaml compose.cpu.yaml >"$tmp/compose.cpu.json" <<'PY'
import json
import sys

import yaml

RESET = object()


class Loader(yaml.SafeLoader):
    pass


Loader.add_constructor("!reset", lambda loader, node: RESET)


def merge(base, override):
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    out = dict(base)
    for key, value in override.items():
        if value is RESET:
            out.pop(key, None)
        else:
            out[key] = merge(base[key], value) if key in base else value
    return out


merged = None
for path in sys.argv[1:]:
    with open(path) as f:
        doc = yaml.load(f, Loader)
    merged = doc if merged is None else merge(merged, doc)
json.dump(merged, sys.stdout, indent=1)
PY
  files=(--project-directory "$PWD" -f "$tmp/compose.cpu.json")
fi
compose() { "${compose_cmd[@]}" -p "$project" "${files[@]}" "$@"; }

cleanup() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    log "service logs:"
    compose logs --no-color --tail=80 >&2 || true
  fi
  log "tearing down"
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building $image"
  start=$(date +%s)
  # shellcheck disable=SC2086
  docker build ${DOCKER_BUILD_FLAGS:-} -t "$image" .
  log "built $image in $(($(date +%s) - start)) s"
fi
log "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"

log "starting with $COMPOSE $compose_version on port $port"
compose up -d --no-build
cid=$(compose ps -q unetseg)
[ -n "$cid" ] || fail "no container"

log "waiting for $base/readyz"
start=$(date +%s)
until curl -fsS -o /dev/null "$base/readyz" 2>/dev/null; do
  [ "$(docker inspect -f '{{.RestartCount}}' "$cid")" = 0 ] || fail "the container restarted"
  [ "$(docker inspect -f '{{.State.Running}}' "$cid")" = true ] || fail "the container stopped"
  [ $(($(date +%s) - start)) -lt "$ready_timeout" ] || fail "not ready after $ready_timeout s: $(curl -sS "$base/readyz")"
  sleep 2
done
log "ready after $(($(date +%s) - start)) s: $(curl -fsS "$base/readyz")"

uid=$(docker exec "$cid" id -u)
[ "$uid" != 0 ] || fail "the service runs as root"

# A 333x251 RGB test frame: a colour gradient with a bright disc on it.
docker exec "$cid" python -c '
import sys
from PIL import Image, ImageDraw
w, h = 333, 251
im = Image.new("RGB", (w, h))
im.putdata([(x * 255 // w, y * 255 // h, 96) for y in range(h) for x in range(w)])
ImageDraw.Draw(im).ellipse((120, 70, 230, 170), fill=(220, 120, 110))
im.save(sys.stdout.buffer, "PNG")
' >"$tmp/image.png"

curl -fsS "$base/v1/models" -o "$tmp/models.json"
check_mask() {
  docker exec -i "$cid" python -c '
import io, json, sys
from PIL import Image
models = json.loads(sys.argv[1])["models"]
name = sys.argv[2]
model = next(m for m in models if m["name"] == name)
im = Image.open(io.BytesIO(sys.stdin.buffer.read()))
assert im.format == "PNG", im.format
assert im.size == (333, 251), f"mask is {im.size}, the image 333x251"
colors = im.getcolors(1 << 16)
assert colors is not None, "more than 65536 distinct mask values"
ids = sorted(value for _, value in colors)
known = {c["id"] for c in model["classes"]}
assert set(ids) <= known, f"mask values {ids} are not class ids of {name}: {sorted(known)}"
print(f"PNG {im.size[0]}x{im.size[1]}, mode {im.mode}, class ids {ids}")
' "$(cat "$tmp/models.json")" "$1" <"$2"
}
header() { tr -d '\r' <"$1" | awk -v k="$2" 'tolower($1) == tolower(k) ":" { $1 = ""; print substr($0, 2) }'; }

# The default model, then every model by name.
code=$(curl -sS -o "$tmp/mask.png" -D "$tmp/headers" -w '%{http_code}' -F "file=@$tmp/image.png;type=image/png" \
  "$base/v1/predict")
[ "$code" = 200 ] || fail "POST /v1/predict: HTTP $code: $(head -c 500 "$tmp/mask.png")"
default_model=$(header "$tmp/headers" X-Model)
log "predict by file: 200, default model $default_model, $(check_mask "$default_model" "$tmp/mask.png")"
log "  $(header "$tmp/headers" Server-Timing)"
models=$(docker exec -i "$cid" python -c 'import json, sys; print(" ".join(m["name"] for m in json.load(sys.stdin)["models"]))' \
  <"$tmp/models.json")
for model in $models; do
  code=$(curl -sS -o "$tmp/mask-$model.png" -D "$tmp/headers" -w '%{http_code}' \
    -F "file=@$tmp/image.png;type=image/png" "$base/v1/predict?model=$model")
  [ "$code" = 200 ] || fail "POST /v1/predict?model=$model: HTTP $code: $(head -c 500 "$tmp/mask-$model.png")"
  [ "$(header "$tmp/headers" X-Model)" = "$model" ] || fail "asked for $model, got $(header "$tmp/headers" X-Model)"
  log "model $model $(header "$tmp/headers" X-Model-Version): 200, $(check_mask "$model" "$tmp/mask-$model.png")"
done

code=$(curl -sS -o "$tmp/upload.json" -w '%{http_code}' -F "file=@$tmp/image.png;type=image/png" "$base/v1/uploads")
[ "$code" = 201 ] || fail "POST /v1/uploads: HTTP $code: $(cat "$tmp/upload.json")"
id=$(docker exec -i "$cid" python -c 'import json, sys; print(json.load(sys.stdin)["id"])' <"$tmp/upload.json")
docker exec "$cid" test -s "/data/uploads/${id:0:2}/$id" || fail "upload $id is not in the /data volume"
code=$(curl -sS -o "$tmp/mask2.png" -w '%{http_code}' -F "upload_id=$id" "$base/v1/predict")
[ "$code" = 200 ] || fail "POST /v1/predict upload_id: HTTP $code: $(head -c 500 "$tmp/mask2.png")"
cmp -s "$tmp/mask.png" "$tmp/mask2.png" || fail "the mask by upload id differs from the mask by file"
log "predict by upload id: 200, same mask; upload stored in the volume"

log "waiting for the container's health check"
start=$(date +%s)
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ]; do
  [ $(($(date +%s) - start)) -lt 120 ] || fail "health: $(docker inspect -f '{{json .State.Health}}' "$cid")"
  sleep 2
done
log "healthy; runs as uid $uid"
log "OK"
