#!/usr/bin/env bash
# Syntax check of the load scenarios: every k6 script (loadtest/k6/**/*.js, parsed as an ES
# module by `node --check`), every wrk Lua script (loadtest/scenarios/*.lua, compiled by LuaJIT,
# the Lua wrk embeds, or by luac when LuaJIT is missing). Also checks that each wrk scenario has
# a k6 twin of the same name and that the k6 scripts' relative imports name existing files.
# Prints one line per file; exits 1 when a check fails, 2 when node or a Lua compiler is missing.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-check-scripts.XXXXXX")
trap 'rm -rf "$work"' EXIT

failures=0
checked=0
pass() { printf 'ok    %s (%s)\n' "$1" "$2"; checked=$((checked + 1)); }
fail() {
  printf 'FAIL  %s (%s)\n' "$1" "$2"
  [[ -s $work/error ]] && sed 's/^/      /' "$work/error"
  failures=$((failures + 1))
  checked=$((checked + 1))
}

command -v node >/dev/null || { echo "check-scripts: node is required to check the k6 scripts (apt-get install nodejs)"; exit 2; }
lua_check=()
if command -v luajit >/dev/null; then
  lua_check=(luajit -b)
  lua_tool=luajit
else
  for candidate in luac5.1 luac luac5.4 luac5.3; do
    if command -v "$candidate" >/dev/null; then
      lua_check=("$candidate" -p)
      lua_tool=$candidate
      break
    fi
  done
fi
((${#lua_check[@]} > 0)) || { echo "check-scripts: luajit (or luac) is required to check the wrk scripts (apt-get install luajit)"; exit 2; }

shopt -s nullglob globstar
k6_scripts=("$here"/k6/**/*.js)
lua_scripts=("$here"/scenarios/*.lua "$here"/scenarios/lib/*.lua)
((${#k6_scripts[@]} > 0)) || { echo "check-scripts: no k6 scripts in $here/k6"; exit 1; }
((${#lua_scripts[@]} > 0)) || { echo "check-scripts: no wrk scripts in $here/scenarios"; exit 1; }

for script in "${k6_scripts[@]}"; do
  name=${script#"$here"/}
  # node parses .mjs files as ES modules; it checks syntax without resolving imports, so k6's
  # modules (k6/http, ...) and globals (__ENV, open) need not exist here.
  copy="$work/${name//\//_}.mjs"
  cp "$script" "$copy"
  if ! node --check "$copy" 2>"$work/raw"; then
    sed "s#$copy#$script#g" "$work/raw" | grep -v '^$' >"$work/error"
    fail "$name" "node --check"
    continue
  fi
  missing=""
  while read -r import; do
    [[ -e $(dirname "$script")/$import ]] || missing="$missing $import"
  done < <(grep -oE "from '\.{1,2}/[^']+'" "$script" | sed -E "s/^from '(.*)'$/\1/")
  if [[ -n $missing ]]; then
    echo "imports missing files:$missing" >"$work/error"
    fail "$name" "relative imports"
    continue
  fi
  : >"$work/error"
  pass "$name" "node --check as an ES module"
done

for script in "${lua_scripts[@]}"; do
  name=${script#"$here"/}
  if "${lua_check[@]}" "$script" /dev/null >"$work/error" 2>&1; then
    pass "$name" "$lua_tool"
  else
    fail "$name" "$lua_tool"
  fi
  twin="$here/k6/$(basename "$script" .lua).js"
  # Scenarios have a k6 twin; the shared library in scenarios/lib has none.
  if [[ $name != scenarios/lib/* && ! -f $twin ]]; then
    echo "no k6 script ${twin#"$here"/} for this scenario" >"$work/error"
    fail "$name" "k6 twin"
  fi
done

echo "${#k6_scripts[@]} k6 and ${#lua_scripts[@]} wrk scripts, $checked checks (node $(node --version), $lua_tool): $failures failed"
((failures == 0))
