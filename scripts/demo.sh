#!/usr/bin/env bash
# The main job on embedded defaults (local store, no daemon, no cloud): a workspace is
# snapshotted, an "agent" changes it, we look at the diff, and restore without losing anything.
set -euo pipefail
demo=$(mktemp -d -t narrative-demo-XXXXXX)
trap 'rm -rf "$demo"' EXIT
export XDG_DATA_HOME="$demo/data"  # the demo's store goes with it (stores live in the data dir)
ws="$demo/workspace"
mkdir -p "$ws/src"
printf 'def add(a, b):\n    return a + b\n' > "$ws/src/calc.py"
printf '# calc\n' > "$ws/README.md"
printf '*.log\n' > "$ws/.gitignore"
printf 'ignored, never snapshotted, never deleted\n' > "$ws/debug.log"
cd "$ws"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "init a shadow store beside the workspace"
narrative init
step "snapshot the starting state"
base=$(narrative -q snapshot -m "starting point")
echo "$base"
step "an agent run on its own thread"
thread=$(narrative thread create agent-attempt --from "$base" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
run=$(narrative run start --manual --thread agent-attempt --agent demo-agent --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
printf 'def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n' > "$ws/src/calc.py"
printf 'mul is new\n' > "$ws/CHANGES.md"
narrative run finish "$run" --exit-code 0
step "what did the run change?"
narrative diff "$base" "$thread" --stat
narrative diff "$base" "$thread" --patch
step "history"
narrative log --all
step "restore the starting point (a safety snapshot is taken first)"
narrative restore "$base"
test ! -e "$ws/CHANGES.md"
test -e "$ws/debug.log"
step "restore --to: materialise the agent's result elsewhere"
narrative restore "$thread" --to "$demo/result"
ls -R "$demo/result"
step "an isolated run through the hub: a runtime in a worktree environment, the workspace untouched"
narrative env create sandbox --require python,git
narrative run start --env sandbox --snapshot "$base" --agent demo-agent -- \
    sh -c 'printf "\n\ndef sub(a, b):\n    return a - b\n" >> src/calc.py && echo "sub added"'
test ! -e "$ws/CHANGES.md"
iso_run=$(narrative run list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][-1]["id"])')
narrative env list
step "its event log: the runtime connected back, the base went in and the result came out as bundles"
narrative run show "$iso_run"
step "what did the isolated run change? merge it into the workspace (three-way, nothing lost)"
narrative diff "$iso_run" --patch
printf '# calc, edited by the user meanwhile\n' > "$ws/README.md"
narrative merge "$iso_run"
grep -q 'def sub' "$ws/src/calc.py"
grep -q 'edited by the user' "$ws/README.md"
narrative env delete sandbox
step "git can read the store"
git --git-dir "$(narrative info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["store"])')" log -n 5 --oneline --glob='refs/narrative/threads/*'
echo
echo "demo finished: every state above is still in the store"
