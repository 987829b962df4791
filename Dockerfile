# syntax=docker/dockerfile:1
# wolkvox-exporter image. Build: docker build -t wolkvox-exporter .
# Run:   docker run -v $PWD/config.yml:/etc/wolkvox-exporter/config.yml:ro -p 19726:19726 wolkvox-exporter
# The same image runs the simulator: --entrypoint python ... -m exporter.simulator (see docker-compose.yml).
# tests/test_image.py builds and runs it on every CI run (docs/install.md: how, and on which base).

# ---- build stage: the package and its dependencies into a virtualenv, then pip and setuptools out of it
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# ---- runtime stage: the virtualenv only, as an unprivileged user
FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The state directory belongs to group 0 with the owner's rights (g=u), so the exporter can also run as
# an arbitrary uid in group 0 (OpenShift's restricted policy) and keep its state_store there.
RUN groupadd --system --gid 10001 wolkvox \
    && useradd --system --uid 10001 --gid wolkvox --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin wolkvox \
    && install -d -o wolkvox -g 0 -m 0770 /var/lib/wolkvox-exporter \
    && install -d -m 0755 /etc/wolkvox-exporter
COPY --from=build /opt/venv /opt/venv
USER 10001:0
WORKDIR /var/lib/wolkvox-exporter
EXPOSE 19726
# The exporter's own health command: it reads the running exporter's --web.listen-address and
# --web.config.file (port, TLS) from its command line, so changing CMD needs no change here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-m", "exporter.health"]
ENTRYPOINT ["wolkvox-exporter", "--config.file=/etc/wolkvox-exporter/config.yml"]
CMD ["--web.listen-address=:19726", "--log.level=info"]
