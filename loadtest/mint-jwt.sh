#!/usr/bin/env bash
# Prints a signed JWT for the load scenarios (wrk `scenarios/jwt-*.lua`, k6 `k6/jwt-*.js`),
# made with openssl alone.
#
#   loadtest/mint-jwt.sh RS256 tests/support/keys/rsa1.pk8.pem [KID] [SUBJECT] [SECONDS]
#   loadtest/mint-jwt.sh HS256 SECRET [KID] [SUBJECT] [SECONDS]
#
# RS256 signs with a PEM private key file; HS256 with the secret given (use `@FILE` to read it
# from a file, without its trailing newline). KID defaults to k1 (the kid of the test fixture
# key rsa1), SUBJECT to bench (the `sub` claim), SECONDS to 86400 (from `iat` to `exp`).
set -euo pipefail

usage() {
  sed -n '4,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
(($# >= 2)) || usage
algorithm=$1
key=$2
kid=${3:-k1}
subject=${4:-bench}
lifetime=${5:-86400}
[[ $lifetime =~ ^[0-9]+$ ]] || { echo "mint-jwt: SECONDS must be a whole number" >&2; exit 2; }
command -v openssl >/dev/null || { echo "mint-jwt: openssl is required" >&2; exit 1; }

base64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
# JSON string content: the claims here come from the command line.
json_escape() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }

issued=$(date +%s)
header=$(printf '{"alg":"%s","typ":"JWT","kid":"%s"}' "$algorithm" "$(json_escape "$kid")" | base64url)
payload=$(printf '{"sub":"%s","iat":%d,"exp":%d}' "$(json_escape "$subject")" "$issued" \
  $((issued + lifetime)) | base64url)
input="$header.$payload"

case $algorithm in
  RS256)
    [[ -r $key ]] || { echo "mint-jwt: cannot read the private key $key" >&2; exit 1; }
    signature=$(printf '%s' "$input" | openssl dgst -sha256 -sign "$key" -binary | base64url)
    ;;
  HS256)
    if [[ $key == @* ]]; then
      [[ -r ${key#@} ]] || { echo "mint-jwt: cannot read the secret file ${key#@}" >&2; exit 1; }
      key=$(cat "${key#@}")
    fi
    [[ -n $key ]] || { echo "mint-jwt: the HS256 secret is empty" >&2; exit 1; }
    signature=$(printf '%s' "$input" | openssl dgst -sha256 -hmac "$key" -binary | base64url)
    ;;
  *)
    echo "mint-jwt: unsupported algorithm $algorithm (RS256 or HS256)" >&2
    exit 2
    ;;
esac
[[ -n $signature ]] || { echo "mint-jwt: openssl could not sign the token" >&2; exit 1; }
printf '%s.%s\n' "$input" "$signature"
