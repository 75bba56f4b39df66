#!/usr/bin/env bash
# The web page's libraries (and Swagger UI for /docs), vendored into src/qwenlite/data/web/ (the page must work
# offline: no CDN). Run this to update them: change a version below, run it, run tests/test_web.py and
# tests/test_openapi.py, commit the files it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="marked@18.2.1 dompurify@3.5.0 @highlightjs/cdn-assets@11.12.0 katex@0.18.11 marked-katex-extension@5.1.13 swagger-ui-dist@5.35.0"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm init -y >/dev/null && npm install --no-audit --no-fund --ignore-scripts $PACKAGES >/dev/null)
m="$tmp/node_modules"
web=src/qwenlite/data/web
cp "$m/marked/lib/marked.umd.js" "$web/marked.umd.js"
cp "$m/marked/LICENSE" "$web/marked.LICENSE.txt"
cp "$m/dompurify/dist/purify.min.js" "$web/purify.min.js"
cp "$m/dompurify/LICENSE" "$web/dompurify.LICENSE.txt"  # Apache-2.0 or MPL-2.0, at the user's choice
cp "$m/dompurify/LICENSE-MPL" "$web/dompurify.LICENSE-MPL.txt"
cp "$m/@highlightjs/cdn-assets/highlight.min.js" "$web/highlight.min.js"  # the common-languages build
cp "$m/@highlightjs/cdn-assets/styles/github.min.css" "$web/highlight-github.min.css"
cp "$m/@highlightjs/cdn-assets/LICENSE" "$web/highlight.js.LICENSE.txt"
cp "$m/katex/dist/katex.min.js" "$web/katex.min.js"  # MathML output: no fonts or stylesheet needed
cp "$m/katex/LICENSE" "$web/katex.LICENSE.txt"
cp "$m/marked-katex-extension/lib/index.umd.js" "$web/marked-katex.umd.js"
cp "$m/marked-katex-extension/LICENSE" "$web/marked-katex.LICENSE.txt"
cp "$m/swagger-ui-dist/swagger-ui-bundle.js" "$web/swagger-ui-bundle.js"  # /docs, FastAPI's Swagger UI, offline
cp "$m/swagger-ui-dist/swagger-ui.css" "$web/swagger-ui.css"
cp "$m/swagger-ui-dist/LICENSE" "$web/swagger-ui.LICENSE.txt"
