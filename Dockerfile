# CPU image that runs `make demo` (README, "Docker"). Not built on the development machine: it has no container
# daemon and no access to a registry of base images.
#   docker build -t medlora .
#   docker run --rm -v medlora-cache:/root/.cache/medlora -v "$PWD/runs:/app/runs" medlora            # make demo
#   docker run --rm -v medlora-cache:/root/.cache/medlora medlora make test
FROM python:3.11-slim

# make and git for the Makefile, g++ for the demo recipe's --torch_compile; the CPU torch wheel comes from
# PyTorch's CPU index (a plain `pip install torch` on Linux pulls the CUDA build).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends make git g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    MEDLORA_HOME=/root/.cache/medlora \
    HF_HUB_OFFLINE=1
# Dependencies first, so that a change of the code does not reinstall them.
COPY pyproject.toml README.md Makefile ./
COPY src/medlora/__init__.py src/medlora/errors.py src/medlora/io.py src/medlora/llamacpp.py src/medlora/
RUN make venv TORCH_INDEX_URL=$TORCH_INDEX_URL
COPY . .
RUN .venv/bin/pip install --quiet --no-deps -e '.[test,web,cmekg,gguf-export]'
CMD ["make", "demo"]
