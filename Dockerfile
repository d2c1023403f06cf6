# The unetseg service: the shipped bundles in weights/ served over HTTP on port 8000.
#
#   docker build -t unetseg .                                                # CUDA image; torch comes with the base
#   docker build --build-arg BASE_IMAGE=python:3.11-slim -t unetseg:cpu .    # CPU-only image (CPU build of torch)
#
# Settings are UNETSEG_* environment variables (docs/api.md lists them); uploads are kept in the /data volume.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# The runtime dependencies as a requirements file, torch left out, with the postgres and s3 extras (so that
# UNETSEG_DATABASE_URL and UNETSEG_BLOB_URL can name PostgreSQL and S3): the install below is cached on
# this list, not on pyproject.toml, so editing the version, the dev tools or their settings reinstalls nothing.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/
RUN python -c "import re, tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['postgres'] + p['optional-dependencies']['s3']; print('\n'.join(d for d in deps if re.split(r'[^A-Za-z0-9._-]', d, maxsplit=1)[0].lower() != 'torch'))" > /tmp/requirements.txt

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UNETSEG_HOST=0.0.0.0 \
    UNETSEG_PORT=8000 \
    UNETSEG_WEIGHTS_DIR=/app/weights \
    UNETSEG_DATA_DIR=/data
WORKDIR /app

# The dependencies, before the code so that a code change does not reinstall them. torch comes with the
# pytorch/pytorch base images; a base without it (python:3.11-slim) gets the CPU build. Then a non-root
# user that owns nothing but the uploads folder and its home (caches of torch.compile).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=requirements /tmp/requirements.txt /tmp/
RUN (python -c "import torch" 2>/dev/null \
     || pip install --no-cache-dir --disable-pip-version-check --index-url "${TORCH_INDEX_URL}" "torch>=2.4") \
    && pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin unetseg \
    && mkdir -p /data \
    && chown unetseg:unetseg /data

# Bundles change less often than code, so they come first. Both stay read-only for the service user.
COPY weights/ ./weights/
COPY model/ ./model/
COPY app/ ./app/

VOLUME ["/data"]
USER unetseg
EXPOSE 8000

# Healthy once every model is loaded and warmed up (/readyz answers 200).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('UNETSEG_PORT', '8000') + '/readyz', timeout=4)"]

# The default command serves; `docker run IMAGE predict --out /data/masks ...` runs another unetseg command.
ENTRYPOINT ["python", "-m", "app.cli"]
CMD ["serve"]
