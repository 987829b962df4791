# syntax=docker/dockerfile:1
# wolkvox-exporter image. Build: docker build -t wolkvox-exporter .
# Run:   docker run -v $PWD/config.yml:/etc/wolkvox-exporter/config.yml:ro -p 19726:19726 wolkvox-exporter
# The same image runs the simulator: --entrypoint python ... -m exporter.simulator (see docker-compose.yml).

# ---- build stage: install the package and its dependencies into a virtualenv
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir .

# ---- runtime stage: the virtualenv only, as an unprivileged user
FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 wolkvox \
    && useradd --system --uid 10001 --gid wolkvox --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin wolkvox \
    && install -d -o wolkvox -g wolkvox -m 0750 /var/lib/wolkvox-exporter \
    && install -d -m 0755 /etc/wolkvox-exporter
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/wolkvox-exporter
EXPOSE 19726
# No curl in the image: the health check is a Python one-liner against /-/healthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:19726/-/healthy', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["wolkvox-exporter", "--config.file=/etc/wolkvox-exporter/config.yml"]
CMD ["--web.listen-address=:19726", "--log.level=info"]
