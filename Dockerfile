# One image for every kvgate part (gateway, MLX daemon, mock LMCache, simulated vLLM);
# docker-compose.yml picks the part with each service's command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first so source edits do not reinstall them.
COPY pyproject.toml ./
RUN mkdir -p kvkernel kvtok gateway filters kvproto mlxd testbed kvbench kvreport \
 && for p in kvkernel kvtok gateway filters kvproto mlxd testbed kvbench kvreport; do touch $p/__init__.py; done \
 && touch README.md \
 && pip install ".[mlx,testbed]" \
 && pip uninstall -y kvgate

COPY kvkernel kvkernel
COPY kvtok kvtok
COPY gateway gateway
COPY filters filters
COPY kvproto kvproto
COPY mlxd mlxd
COPY testbed testbed
COPY kvbench kvbench
COPY kvreport kvreport
COPY configs configs
RUN pip install --no-deps -e . && mkdir -p logs

EXPOSE 8888
CMD ["kvgate", "serve", "-c", "configs/compose.yaml"]
