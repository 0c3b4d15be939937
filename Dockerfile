# The rescat HTTP service. Build from the repository root:
#   docker build -t rescat .
# and run it against a MongoDB replica set (see compose.yaml):
#   docker run -p 8470:8470 -e RESCAT_MONGO_URI=mongodb://db:27017/?replicaSet=rs0 rescat
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY catalog ./catalog
COPY storage ./storage
COPY service ./service
COPY cli ./cli
RUN pip install . && useradd --system --uid 10001 rescat

USER rescat
EXPOSE 8470
# RESCAT_MONGO_URI must point at a replica set: without it rescat would try to
# start an embedded mongod, which this image does not ship.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8470/healthz', timeout=2)"
ENTRYPOINT ["rescat"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8470"]
