# The pipeline as one image: Prefect workers, data stages and training all run from it.
# Build it from the repository root (`docker build -t dalle-pipeline:0.1.0 .`, or through
# infra/docker-compose.yml); .dockerignore keeps .venv, runs/ and caches out of the build context.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# The same install as `make install`: torch first from TORCH_SPEC (the Makefile's default;
# on aarch64 build with --build-arg TORCH_SPEC='torch==2.9.1 torchvision==0.24.1'), then the
# package, every dependency at the version constraints.txt pins (`make lock` refreshes it).
# On x86_64 the default torch wheel already carries CUDA (its nvidia-* wheels come with it), so
# this image trains on GPUs as it is when the NVIDIA container runtime passes them in; to pick
# another CUDA build, put pip's index option for it into TORCH_SPEC along with the versions.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"

WORKDIR /opt/dalle
COPY constraints.txt ./
RUN pip install -c constraints.txt ${TORCH_SPEC}

COPY pyproject.toml README.md ./
COPY dalle ./dalle
COPY flows ./flows
COPY demo ./demo
COPY configs ./configs
# infra/ holds prefect.yaml (the deployments) and the Kubernetes work pool's base job template,
# which `dalle pools --gpu-kubernetes` reads inside the image.
COPY infra ./infra

# img2dataset pulls in the `dataclasses` backport, which shadows the standard library
# and breaks Prefect's API server: remove it after installing (tests/test_install.py).
RUN pip install -c constraints.txt . \
 && pip uninstall -y dataclasses \
 && python -c "import dataclasses, sys; assert 'site-packages' not in dataclasses.__file__"

RUN useradd --create-home dalle
USER dalle
# No ENTRYPOINT on purpose: a Prefect worker (process or Kubernetes) runs its own command in this
# image, e.g. `prefect flow-run execute`, and an entrypoint would be put in front of it.
CMD ["dalle", "--help"]
