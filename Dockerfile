# wsgate container image. The deployment issue fills in hardening and probes;
# this builds and runs the gateway with a config mounted at /etc/wsgate.
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY wsgate ./wsgate
RUN pip install --no-cache-dir . && useradd --system --no-create-home wsgate
USER wsgate
EXPOSE 8080 9090
ENTRYPOINT ["wsgate"]
CMD ["run", "-c", "/etc/wsgate/wsgate.yaml"]
