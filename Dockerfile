FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
COPY requirements.txt pyproject.toml Makefile ./
COPY protos protos
COPY services services
COPY deploy deploy
COPY bench bench
COPY requirements-nodeps.txt ./
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt \
 && mkdir -p services/gen && python -m grpc_tools.protoc -Iprotos --python_out=services/gen --pyi_out=services/gen \
      --grpc_python_out=services/gen $(find protos -name '*.proto') \
 && find services/gen/knowstream -type d -exec touch {}/__init__.py \;
ENV PYTHONPATH=/app:/app/services/gen
