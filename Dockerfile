# GPU image: PyTorch + transformer-engine + apex (from the NGC base), SGLang, sglang-router,
# megatron-core and gvm_mega. Build on a machine with Docker and network access:
#   docker build -t gvm-mega .
#   docker run --gpus all --ipc=host -v $PWD/runs:/opt/gvm_mega/runs gvm-mega train configs/demo_cpu.yaml
# The NGC PyTorch image already ships transformer-engine and NVIDIA apex; apex is not on PyPI
# (the PyPI package named "apex" is unrelated), so it is built from source if missing.
FROM nvcr.io/nvidia/pytorch:25.02-py3

ARG SGLANG_VERSION=0.4.10.post2
ARG SGLANG_ROUTER_VERSION=0.1.9
ARG APEX_REF=25.02

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

RUN python -c "import transformer_engine.pytorch" \
 && (python -c "import apex" 2>/dev/null || ( \
      git clone --depth 1 --branch "${APEX_REF}" https://github.com/NVIDIA/apex /tmp/apex \
      && pip install -v --no-build-isolation \
           --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" /tmp/apex \
      && rm -rf /tmp/apex))

RUN pip install "sglang[srt]==${SGLANG_VERSION}" "sglang-router==${SGLANG_ROUTER_VERSION}"

WORKDIR /opt/gvm_mega
COPY . /opt/gvm_mega
RUN pip install -e . && python -c "import gvm_mega, kernels, megatron.core, sglang"

HEALTHCHECK --interval=60s --timeout=30s --start-period=30s --retries=3 \
  CMD python -c "import gvm_mega, megatron.core" || exit 1

ENTRYPOINT ["/opt/gvm_mega/launch/entrypoint.sh"]
CMD ["gvm-mega", "--help"]
