# exposrd: options come from EXPOSR_* variables (or arguments after the image name).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY setup.cfg setup.py README.rst ./
COPY exposr ./exposr
COPY twisted ./twisted
COPY docker/entrypoint.sh /usr/local/bin/exposrd-entrypoint

# Install, then build the twistd plugin cache as root: the unprivileged user
# cannot write it at run time.
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && python -c "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker; assert 'exposrd' in [p.tapname for p in getPlugins(IServiceMaker)]" \
    && chmod 0755 /usr/local/bin/exposrd-entrypoint \
    && mkdir -p /entrypoint-initdb.d /data \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin exposr \
    && chown exposr /data \
    && rm -rf /src

WORKDIR /data
USER 10001
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/exposrd-entrypoint"]
