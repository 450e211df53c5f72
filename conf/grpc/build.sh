#!/usr/bin/env bash
# Rebuilds the descriptor sets of the example service (protoc from grpcio-tools:
# `pip install grpcio-tools`) and prints their SHA-256, which conf/examples/protocols.yaml pins.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m grpc_tools.protoc -I . --include_imports --descriptor_set_out=echo.pb echo.proto
python3 -m grpc_tools.protoc -I . --include_imports --descriptor_set_out=echo-extra.pb echo.proto extra.proto
sha256sum echo.pb echo-extra.pb
