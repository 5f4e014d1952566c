# wsgate container image: `docker build -t wsgate .` (or ./scripts/image.sh build,
# with podman and no registry). The build stage compiles the frame scanner's C
# speed-up into wsgate's wheel and fetches the wheels of its dependencies; the
# final stage has only those installed, and no compiler.
#
# Build arguments:
#   BUILD_IMAGE, RUNTIME_IMAGE  the two base images, for a registry of your own
#   VERSION, SOURCE, REVISION   the OCI labels: wsgate's version, where its source is, the commit
#   PIP_INDEX_URL               a package index for the build stage (default: pip's own)
# A build secret `ca` (--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt) is
# the CA bundle pip trusts in the build stage; it is not kept in any layer.

ARG BUILD_IMAGE=python:3.12
ARG RUNTIME_IMAGE=python:3.12-slim

FROM ${BUILD_IMAGE} AS build
ARG PIP_INDEX_URL=
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY wsgate ./wsgate
# setup.py lets an install go on without the speed-up; an image must have it, so
# the build fails here when it did not compile.
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ -n "$PIP_INDEX_URL" ]; then export PIP_INDEX_URL; else unset PIP_INDEX_URL; fi; \
    pip wheel --no-cache-dir --wheel-dir /wheels . \
    && python -c "import glob, sys, zipfile; \
wheel, = glob.glob('/wheels/wsgate-*.whl'); \
names = zipfile.ZipFile(wheel).namelist(); \
sys.exit(0 if any(n.startswith('wsgate/_speedups') for n in names) else 'no C speed-up in ' + wheel)"

# wsgate and its dependencies in a venv of the runtime image's own Python, which
# the final stage copies whole: no wheel, pip cache or compiler goes with it.
FROM ${RUNTIME_IMAGE} AS install
COPY --from=build /wheels /wheels
RUN python -m venv --without-pip /opt/wsgate \
    && pip --python /opt/wsgate/bin/python install --no-cache-dir --no-index --find-links /wheels wsgate \
    && /opt/wsgate/bin/python -c "import uvloop, wsgate._speedups"

FROM ${RUNTIME_IMAGE}
# A fixed UID: the one deploy/kubernetes runs as (runAsUser: 65532).
RUN groupadd --gid 65532 wsgate \
    && useradd --uid 65532 --gid 65532 --no-create-home --no-log-init --home-dir /nonexistent \
       --shell /usr/sbin/nologin wsgate
COPY --from=install /opt/wsgate /opt/wsgate
ENV PATH=/opt/wsgate/bin:$PATH
COPY deploy/container/wsgate.yaml /etc/wsgate/wsgate.yaml
ARG VERSION=unknown
ARG SOURCE=
ARG REVISION=
LABEL org.opencontainers.image.title="wsgate" \
      org.opencontainers.image.description="A frame-aware reverse proxy and load balancer for WebSockets" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
# The listener and the admin server of the config above.
EXPOSE 8080 9090
# Only Python: the runtime image may have neither curl nor wget.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WSGATE_ADMIN_PORT', '9090'), timeout=2)"]
# Exec form: wsgate is PID 1 and gets SIGTERM itself, which starts the drain.
ENTRYPOINT ["wsgate"]
CMD ["run", "-c", "/etc/wsgate/wsgate.yaml"]
