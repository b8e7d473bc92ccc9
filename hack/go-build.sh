# Sourced by hack/build-controlplane.sh and hack/build-kubeflow.sh: where the binaries go and
# how each is built. Go's module and build caches stay in their default places in $HOME, so a
# second clone rebuilds in minutes; a binary already built from the same go.sum is kept, so a
# second run takes seconds.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${BIN:-$root/.bin}
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

# build MODULE_DIR PACKAGE NAME LDFLAGS [OVERLAY_DIR]: skipped when NAME was built from this
# go.sum, flags and overlay (OVERLAY_DIR/overlay.json for `go build -overlay`, and the .go files it names).
build() {
  local dir=$1 pkg=$2 name=$3 ldflags=$4 overlay=${5:-}
  local stamp="$bin/.$name.stamp" want flags=()
  want=$( (cat "$dir/go.mod" "$dir/go.sum"; echo "$ldflags"; [[ -z $overlay ]] || cat "$overlay"/*.go) \
    | sha256sum | cut -c1-16)
  if [[ -x "$bin/$name" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  [[ -z $overlay ]] || flags=(-overlay "$overlay/overlay.json")
  echo "building $name ($pkg)"
  (cd "$dir" && go build -trimpath "${flags[@]}" -ldflags "$ldflags" -o "$bin/$name" "$pkg")
  echo "$want" > "$stamp"
}

# patch_main WHAT SOURCE_MAIN FIXED REPLACEMENT MODULE_DIR CMD_DIR OVERLAY_DIR: a copy of SOURCE_MAIN
# in OVERLAY_DIR with the one occurrence of FIXED replaced by REPLACEMENT (literally), and
# OVERLAY_DIR/overlay.json adding that copy to MODULE_DIR as ./CMD_DIR for `build`: Go refuses to
# overlay files in the module cache, so the copy becomes a package of our own module. Exits when
# upstream moved on: FIXED not there exactly once, or more than main.go in its directory (a copy
# of main.go alone would lose the rest).
patch_main() {
  local what=$1 source=$2 fixed=$3 replacement=$4 dir=$5 cmd=$6 overlay=$7 text
  if [[ $(grep -cF "$fixed" "$source") != 1 || $(ls "$(dirname "$source")") != main.go ]]; then
    echo "$what is not the one whose $fixed this patches (update $0)" >&2
    exit 1
  fi
  mkdir -p "$overlay"
  text=$(cat "$source")
  printf '%s\n' "${text/"$fixed"/"$replacement"}" > "$overlay/main.go"
  printf '{"Replace": {"%s": "%s"}}\n' "$dir/$cmd/main.go" "$overlay/main.go" > "$overlay/overlay.json"
}
