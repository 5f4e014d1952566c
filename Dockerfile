# wsgate container image. The deployment issue fills in hardening and probes;
# this builds and runs the gateway with a config mounted at /etc/wsgate.

# The full image has a C compiler for the frame scanner's speed-up (wsgate/_speedups.c).
FROM python:3.12 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY wsgate ./wsgate
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels wsgate \
    && rm -rf /wheels \
    && useradd --system --no-create-home wsgate
USER wsgate
EXPOSE 8080 9090
ENTRYPOINT ["wsgate"]
CMD ["run", "-c", "/etc/wsgate/wsgate.yaml"]
