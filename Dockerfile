# syntax=docker/dockerfile:1
# Two images from one file, each installing only what its service runs:
#   docker build --target broker -t zchat-broker .     (zchat-common + zchat-broker)
#   docker build --target client -t zchat-client .     (zchat-common + zchat-client: CLI and bots)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# /keys: where docker-compose.secure.yml's named volume of CURVE keys is mounted; a new volume
# takes this directory's owner and mode, so zchat-keygen (running as zchat) can write there.
RUN useradd --create-home --uid 10001 zchat && install -d -o zchat -g zchat -m 0700 /keys
WORKDIR /src
COPY common/ common/

FROM base AS broker
COPY broker/ broker/
RUN pip install ./common ./broker && rm -rf /src \
    && mkdir /data && chown zchat:zchat /data
# The message store; a named volume mounted here inherits the zchat user's ownership.
ENV ZCHAT_DATA_DIR=/data
VOLUME ["/data"]
USER zchat
WORKDIR /home/zchat
EXPOSE 5555 5556 9100
# Asks the broker itself (a stats request through its ROUTER), not just whether a port is open.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["zchat-broker", "check", "--timeout", "3"]
CMD ["zchat-broker"]

FROM base AS client
COPY client/ client/
RUN pip install ./common ./client && rm -rf /src
USER zchat
WORKDIR /home/zchat
ENTRYPOINT ["zchat-client"]
