#!/usr/bin/env bash
# Start a gossipfl node on this host (or on other hosts over SSH) with sensible LAN defaults.
#
#   scripts/launch_lan.sh [OPTIONS] [-- NODE OPTIONS]
#
# On this host (default): finds the LAN IPv4 address (the source address of the default route, found
# with `ip route get`, which sends nothing; else the first of `hostname -I`), takes port 8470 if it is
# free or else any free port, keeps mDNS on the LAN interface only (--mdns-interface <LAN IP>), and
# starts `gossipfl node` in the background with nohup. Everything of the node lives in one directory,
# RUN_DIR/<node id>/ (default ./gossipfl-run/<hostname>-<port>/): node.log, node.pid, the command line,
# and later its checkpoints.
#
# Options:
#   --port P          HTTP port (default: 8470 if free, else a free one)
#   --ip A            the address to use instead of the detected LAN address
#   --id ID           node id (default <hostname>-<port>, as the node itself would choose)
#   --partition K/N   this node's shard (default: the node's 0/1; with --hosts, K/N by position)
#   --run-dir DIR     parent of the node directories (default ./gossipfl-run)
#   --gossipfl CMD    the gossipfl executable (default .venv/bin/gossipfl of this checkout, else PATH)
#   --foreground      run in the foreground (exec; logs still go to node.log and the terminal)
#   --stop            send SIGTERM to the node(s) started from RUN_DIR and wait for them to exit
#   --hosts H1,H2,..  start one node on each host over SSH instead (`localhost` = this host) by running
#                     this script there: every host needs this checkout (with its .venv) at
#                     --remote-dir (default: this checkout's path). Partitions K/N by position.
#   --ssh CMD         ssh command (default: ssh -o BatchMode=yes)
#   --dry-run         print the commands, run nothing
#   NODE OPTIONS      after `--` (or any option not listed above): passed to `gossipfl node`, e.g.
#                     -- --merge age --seeds 10.0.0.5:8470. They win over the defaults above
#                     (e.g. --mdns-interface, --host).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="" ip="" id="" partition="" run_dir="./gossipfl-run" gossipfl_cmd="" foreground=0 stop=0
hosts="" ssh_cmd="ssh -o BatchMode=yes" remote_dir="$here" dry_run=0
node_args=()

die() { echo "launch_lan: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --port) need "$@"; port="$2"; shift 2 ;;
        --ip) need "$@"; ip="$2"; shift 2 ;;
        --id) need "$@"; id="$2"; shift 2 ;;
        --partition) need "$@"; partition="$2"; shift 2 ;;
        --run-dir) need "$@"; run_dir="$2"; shift 2 ;;
        --gossipfl) need "$@"; gossipfl_cmd="$2"; shift 2 ;;
        --foreground) foreground=1; shift ;;
        --stop) stop=1; shift ;;
        --hosts) need "$@"; hosts="$2"; shift 2 ;;
        --ssh) need "$@"; ssh_cmd="$2"; shift 2 ;;
        --remote-dir) need "$@"; remote_dir="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; node_args+=("$@"); break ;;
        *) node_args+=("$1"); shift ;;
    esac
done

# Print a command as a shell would read it back.
show() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# ---- several hosts: run this script on each of them over SSH --------------------------------------
if [ -n "$hosts" ]; then
    IFS=',' read -r -a host_list <<<"$hosts"
    n=${#host_list[@]}
    rc=0
    for k in "${!host_list[@]}"; do
        h="${host_list[$k]}"
        args=()
        [ "$stop" = 1 ] && args+=(--stop)
        if [ "$stop" = 0 ]; then
            args+=(--partition "${partition:-$k/$n}")
            [ -n "$port" ] && args+=(--port "$port")
        fi
        args+=(--run-dir "$run_dir")
        [ -n "$gossipfl_cmd" ] && args+=(--gossipfl "$gossipfl_cmd")
        [ ${#node_args[@]} -gt 0 ] && args+=(-- "${node_args[@]}")
        if [ "$h" = localhost ] || [ "$h" = 127.0.0.1 ]; then
            echo "# $h"
            if [ "$dry_run" = 1 ]; then "${BASH_SOURCE[0]}" --dry-run "${args[@]}" || rc=1
            else "${BASH_SOURCE[0]}" "${args[@]}" || rc=1; fi
        else
            remote="cd $(printf '%q' "$remote_dir") && scripts/launch_lan.sh $(show "${args[@]}")"
            echo "# $h"
            echo "$ssh_cmd -n $h '${remote//\'/\'\\\'\'}'"
            [ "$dry_run" = 1 ] && continue
            # shellcheck disable=SC2086  # ssh_cmd is a command line
            $ssh_cmd -n "$h" "$remote" || { echo "launch_lan: $h failed" >&2; rc=1; }
        fi
    done
    exit $rc
fi

# ---- --stop: SIGTERM to the nodes started from run_dir ----------------------------------------------
if [ "$stop" = 1 ]; then
    shopt -s nullglob
    for pidfile in "$run_dir"/*/node.pid; do
        pid="$(cat "$pidfile")"
        if [ "$dry_run" = 1 ]; then echo "kill -TERM $pid   # $(dirname "$pidfile")"; continue; fi
        if kill -TERM "$pid" 2>/dev/null; then
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then echo "launch_lan: $pid still running after 10 s" >&2
            else echo "stopped $(basename "$(dirname "$pidfile")") (pid $pid)"; rm -f "$pidfile"; fi
        else
            rm -f "$pidfile"
        fi
    done
    exit 0
fi

# ---- one node on this host ------------------------------------------------------------------------
lan_ip() {
    local a
    # `ip route get` asks the kernel's routing table; no packet is sent.
    a="$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n1)"
    [ -n "$a" ] || a="$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+(\.[0-9]+){3}$' | head -n1 || true)"
    echo "${a:-127.0.0.1}"
}
free_port() {  # 8470 when nothing listens on it, else one the kernel picks
    python3 - "$1" <<'EOF'
import socket, sys
for port in (int(sys.argv[1]), 0):
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
EOF
}

[ -n "$ip" ] || ip="$(lan_ip)"
[ -n "$port" ] || port="$(free_port 8470)"
host_short="$(hostname -s 2>/dev/null || hostname)"
host_short="$(echo "$host_short" | tr -c 'A-Za-z0-9._\n-' '-')"
[ -n "$id" ] || id="${host_short:0:50}-$port"
if [ -z "$gossipfl_cmd" ]; then
    if [ -x "$here/.venv/bin/gossipfl" ]; then gossipfl_cmd="$here/.venv/bin/gossipfl"
    else gossipfl_cmd="gossipfl"; fi
fi
node_dir="$run_dir/$id"

cmd=("$gossipfl_cmd" node --port "$port" --id "$id" --mdns-interface "$ip")
[ -n "$partition" ] && cmd+=(--partition "$partition")
cmd+=("${node_args[@]}")   # last: argparse keeps the last value, so these override the defaults

if [ "$dry_run" = 1 ]; then
    echo "mkdir -p $(printf '%q' "$node_dir")"
    if [ "$foreground" = 1 ]; then
        echo "cd $(printf '%q' "$node_dir") && exec $(show "${cmd[@]}") 2>&1 | tee -a node.log"
    else
        echo "cd $(printf '%q' "$node_dir") && nohup $(show "${cmd[@]}") >>node.log 2>&1 </dev/null & echo \$! >node.pid"
    fi
    echo "# node $id at http://$ip:$port/ (mDNS on $ip)"
    exit 0
fi

mkdir -p "$node_dir"
# The node's working directory is its own directory; an absolute gossipfl path keeps working there.
case "$gossipfl_cmd" in /*) ;; */*) cmd[0]="$(cd "$(dirname "$gossipfl_cmd")" && pwd)/$(basename "$gossipfl_cmd")" ;; esac
cd "$node_dir"
if [ -f node.pid ] && kill -0 "$(cat node.pid)" 2>/dev/null; then
    die "a node already runs from $node_dir (pid $(cat node.pid)); --stop it first"
fi
show "${cmd[@]}" >command.txt
if [ "$foreground" = 1 ]; then
    echo "node $id at http://$ip:$port/ (mDNS on $ip), log $node_dir/node.log" >&2
    echo $$ >node.pid
    # tee ignores Ctrl-C and SIGTERM so that it records the node's last lines as it stops
    exec > >(trap '' INT TERM; exec tee -a node.log) 2>&1
    exec "${cmd[@]}"
fi
nohup "${cmd[@]}" >>node.log 2>&1 </dev/null &
pid=$!
echo "$pid" >node.pid
# A bad option or a taken port stops the node within a moment (exit code 2): report it here.
for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    grep -q "node up at" node.log 2>/dev/null && break
    sleep 0.5
done
if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid" && rc=0 || rc=$?
    rm -f node.pid
    echo "launch_lan: the node exited (code $rc); $node_dir/node.log:" >&2
    tail -n 5 node.log >&2
    exit 1
fi
echo "node $id at http://$ip:$port/ (pid $pid, mDNS on $ip), log $node_dir/node.log"
echo "  status: curl -s http://$ip:$port/v1/status | python3 -m json.tool"
echo "  stop:   $(show "$here/scripts/launch_lan.sh" --run-dir "$run_dir" --stop)   (SIGTERM)"
