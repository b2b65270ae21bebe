#!/usr/bin/env bash
# Run a command on a Vulkan driver with cooperative matrices: Mesa 26's lavapipe
# (trixie-backports: 8x8 f16 blocks with f32 sums), which Debian 12's Mesa 22 lacks.
# Its libraries need trixie's glibc, so they are unpacked (not installed) under
# target/coop-driver with their dependencies, and the command's binaries run under
# trixie's dynamic loader: cargo's test binaries through its target runner, any other
# command directly. Fetched once (about 70 MB); nothing on the system changes.
#
#   bash scripts/coop-driver.sh cargo test --release --test coop -- --ignored
#   bash scripts/coop-driver.sh target/release/webtune info
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$PWD/target/coop-driver
lib=$dir/root/usr/lib/x86_64-linux-gnu
if [ ! -f "$dir/lvp.json" ] || [ ! -x "$lib/ld-linux-x86-64.so.2" ]; then
  rm -rf "$dir"
  mkdir -p "$dir/apt/lists/partial" "$dir/cache/archives/partial" "$dir/debs"
  touch "$dir/apt/status"
  cat > "$dir/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
EOF
  apt=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State=$dir/apt"
       -o "Dir::State::status=$dir/apt/status" -o "Dir::Cache=$dir/cache" -qq)
  # As root, apt would fetch as _apt, who cannot write here; as anyone else it fetches as them.
  [ "$(id -u)" = 0 ] && apt+=(-o APT::Sandbox::User=root)
  apt-get "${apt[@]}" update
  # The newest Mesa trixie-backports has, and everything it needs, recursively.
  mesa=$(apt-cache "${apt[@]}" madison mesa-vulkan-drivers | awk '/trixie-backports/ {print $3; exit}')
  [ -n "$mesa" ] || { echo "error: trixie-backports has no mesa-vulkan-drivers" >&2; exit 1; }
  pkgs=$(apt-cache "${apt[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
           --no-replaces --no-enhances "mesa-vulkan-drivers=$mesa" libvulkan1 | grep -v '^ ' | grep -v '<' | grep -v '^mesa-vulkan-drivers$' | sort -u)
  (cd "$dir/debs" && apt-get "${apt[@]}" download $pkgs "mesa-vulkan-drivers=$mesa")
  for f in "$dir"/debs/*.deb; do dpkg-deb -x "$f" "$dir/root"; done
  sed "s#\"library_path\": *\"[^\"]*\"#\"library_path\": \"$lib/libvulkan_lvp.so\"#" \
    "$dir/root/usr/share/vulkan/icd.d/lvp_icd.json" > "$dir/lvp.json"
  rm -rf "$dir/debs" "$dir/cache"
  echo "Mesa $mesa's lavapipe unpacked under $dir"
fi
export VK_ICD_FILENAMES=$dir/lvp.json VK_DRIVER_FILES=$dir/lvp.json
mkdir -p "${XDG_RUNTIME_DIR:=/tmp/xdg-$(id -u)}" && chmod 700 "$XDG_RUNTIME_DIR" && export XDG_RUNTIME_DIR
loader=("$lib/ld-linux-x86-64.so.2" --library-path "$lib")
if [ "${1:-}" = cargo ]; then
  export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="${loader[*]}"
  exec "$@"
fi
exec "${loader[@]}" "$@"
