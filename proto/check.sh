#!/usr/bin/env bash
# API checks for proto/: buf lint (STANDARD), buf breaking (FILE) against the previous commit, and the check that
# the committed generated code in server/gen/ is exactly what the protos give. Used by .ci/run.
#   BUF_AGAINST=<git ref>  compare against another ref (default HEAD~1; locally, HEAD checks uncommitted edits)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v buf >/dev/null 2>&1 || python -m pip install -q buf-bin==1.75.0
buf lint
echo "buf lint: ok"
against="${BUF_AGAINST:-HEAD~1}"
if git rev-parse -q --verify "${against}^{commit}" >/dev/null 2>&1 \
    && git cat-file -e "${against}:proto/cloak/v1" 2>/dev/null \
    && git cat-file -e "${against}:buf.yaml" 2>/dev/null; then
  buf breaking --against ".git#ref=${against}"
  echo "buf breaking (FILE): ok against ${against}"
else
  echo "buf breaking: skipped (${against} has no proto/cloak/v1 to compare against)"
fi
python -m server.codegen --check
