# The voice bot: `bot serve` (Twilio webhook/stream + SIP + /metrics) as a non-root user.
# Build: docker build -t voicebot .    Run the whole stack: docker compose up (docs/ops.md)
FROM python:3.11-slim

# espeak-ng: fallback voice; redis-tools: redis-cli for debugging/runbooks; libsndfile1: soundfile;
# curl: the HEALTHCHECK below. No compilers: every Python dependency ships wheels.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      espeak-ng redis-tools libsndfile1 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BOT_HTTP_HOST=0.0.0.0 \
    BOT_HTTP_PORT=8080 \
    BOT_SIP_PORT=5060 \
    BOT_DATA_DIR=/var/lib/voicebot

RUN groupadd --system --gid 10001 voicebot \
 && useradd --system --uid 10001 --gid voicebot --home-dir /app --shell /usr/sbin/nologin voicebot

WORKDIR /app
# dependencies first so code edits do not rebuild the (large) dependency layer
COPY pyproject.toml README.md ./
RUN mkdir -p bot telephony engine policies ops \
 && touch bot/__init__.py telephony/__init__.py engine/__init__.py policies/__init__.py ops/__init__.py \
 && pip install . && pip uninstall -y voicebot
COPY bot ./bot
COPY telephony ./telephony
COPY engine ./engine
COPY policies ./policies
COPY ops ./ops
RUN pip install --no-deps . \
 && mkdir -p /var/lib/voicebot && chown -R voicebot:voicebot /var/lib/voicebot

USER voicebot:voicebot
EXPOSE 8080/tcp 5060/udp 5060/tcp
VOLUME ["/var/lib/voicebot"]

# /healthz is liveness (the process answers); /readyz gates traffic (compose depends_on, k8s). The HTTP
# port answers only once start-up is done, and a fresh BOT_DATA_DIR volume renders every prompt first
# (~100 s on 2 busy cores): a shorter start period marks a healthy first start unhealthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${BOT_HTTP_PORT}/healthz" || exit 1

# SIGTERM drains live calls for BOT_SHUTDOWN_GRACE_S (compose stop_grace_period is longer)
STOPSIGNAL SIGTERM
ENTRYPOINT ["bot"]
CMD ["serve"]
