# exposrd: options come from EXPOSR_* variables (or arguments after the image name).
#
# BASE is any Debian-like image with Python 3.11+ (`python3` and its venv module):
# the official python:3.11-slim by default; deploy/image-test.sh builds on a local
# debootstrapped Debian bookworm (Debian's python3) with --build-arg BASE=...
ARG BASE=python:3.11-slim

# --- build: a venv in /opt/exposr (Debian's pip refuses the system Python) -------
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY setup.cfg setup.py README.rst ./
COPY exposr ./exposr
COPY twisted ./twisted
# Not needed to run: pip, setuptools and the libraries' own test packages. The
# twistd plugin cache (twisted/plugins/dropin.cache) is written last: the
# unprivileged user cannot write it at run time.
RUN python3 -m venv /opt/exposr \
    && /opt/exposr/bin/pip install --no-cache-dir . \
    && /opt/exposr/bin/pip uninstall -y -q setuptools pip \
    && find /opt/exposr/lib/python3*/site-packages -depth -type d \( -name test -o -name tests \) \
        -exec rm -rf {} + \
    && /opt/exposr/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && /opt/exposr/bin/python -c "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker; assert 'exposrd' in [p.tapname for p in getPlugins(IServiceMaker)]"

# --- run ------------------------------------------------------------------------
FROM ${BASE}
ENV PATH=/opt/exposr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXPOSR_ADMIN_ENABLE=true
COPY --from=build /opt/exposr /opt/exposr
COPY docker/entrypoint.sh /usr/local/bin/exposrd-entrypoint
COPY docker/healthcheck.py /usr/local/bin/exposrd-healthcheck
RUN chmod 0755 /usr/local/bin/exposrd-entrypoint /usr/local/bin/exposrd-healthcheck \
    && mkdir -p /entrypoint-initdb.d /data \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin exposr \
    && chown exposr /data

WORKDIR /data
USER 10001
# API + HTTP ingress, admin (/ping, /health: 8081 by default, 9000 in the Helm
# chart), SSH transport, SNI ingress, UDP cluster bus.
EXPOSE 8080 8081 9000 2200 4430 1025/udp
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/exposrd-healthcheck"]
ENTRYPOINT ["/usr/local/bin/exposrd-entrypoint"]
