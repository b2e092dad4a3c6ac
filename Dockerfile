# The pipeline as one image: Prefect workers, data stages and training all run from it.
# CPU by default; for GPU nodes build FROM an NVIDIA CUDA runtime image with the same steps.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# The same install as `make install`: torch first from TORCH_SPEC (the Makefile's default;
# on aarch64 build with --build-arg TORCH_SPEC='torch==2.9.1 torchvision==0.24.1'), then the
# package, every dependency at the version constraints.txt pins (`make lock` refreshes it).
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"

WORKDIR /opt/dalle
COPY constraints.txt ./
RUN pip install -c constraints.txt ${TORCH_SPEC}

COPY pyproject.toml README.md ./
COPY dalle ./dalle
COPY flows ./flows
COPY demo ./demo
COPY configs ./configs

# img2dataset pulls in the `dataclasses` backport, which shadows the standard library
# and breaks Prefect's API server: remove it after installing (tests/test_install.py).
RUN pip install -c constraints.txt . \
 && pip uninstall -y dataclasses \
 && python -c "import dataclasses, sys; assert 'site-packages' not in dataclasses.__file__"

RUN useradd --create-home dalle
USER dalle
ENTRYPOINT ["dalle"]
CMD ["--help"]
