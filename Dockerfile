# One image, three entry points (zchat-broker, zchat-client); the compose file picks one.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY common/ common/
COPY broker/ broker/
COPY client/ client/
RUN pip install ./common ./broker ./client && rm -rf /src
RUN useradd --create-home --uid 10001 zchat && mkdir /data && chown zchat:zchat /data
# The message store; a named volume mounted here inherits the zchat user's ownership.
ENV ZCHAT_DATA_DIR=/data
VOLUME ["/data"]
USER zchat
WORKDIR /home/zchat
EXPOSE 5555 5556
CMD ["zchat-broker"]
