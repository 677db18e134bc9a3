# Shared by the launch scripts: printing and running commands, packing this checkout.
# shellcheck shell=bash

DRY_RUN=${DRY_RUN:-0}

# One argument as it would be typed: bare when safe, else in single quotes.
quote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$' flag='^(--[A-Za-z0-9_.-]+=)(.*)$'
  if [[ "$1" =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ $flag ]]; then  # --flag='value with spaces'
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command, then runs it unless this is a dry run.
run() {
  local arg
  printf '+'
  for arg in "$@"; do printf ' '; quote "$arg"; done
  printf '\n'
  ((DRY_RUN)) || "$@"
}

# The source a worker needs to install the package and find the config files.
SOURCE_FILES=(setup.py README.md ablate_jax configs)

pack_source() {  # pack_source ROOT OUT.tgz
  run tar -C "$1" --exclude=__pycache__ -czf "$2" "${SOURCE_FILES[@]}"
}

# The comment block at the top of the calling script, without its '#'.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}
