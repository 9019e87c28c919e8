#!/usr/bin/env bash
# Start a gossipfl node on this host (or one on each of several hosts over SSH) with LAN defaults,
# stop it, and start it again where it left off. docs/lan.md has the whole story.
#
#   scripts/launch_lan.sh [OPTIONS] [-- NODE OPTIONS]
#
# One node per host: a second start while a node started from RUN_DIR runs is refused (exit 2) unless
# --another. The node runs in the background (nohup) with mDNS on the LAN address only (found with
# `ip route get`, which sends nothing; else `hostname -I`), its checkpoints in RUN_DIR (--state-dir),
# and everything else in RUN_DIR/<node id>/: node.log (appended), node.pid, launch.env (what it was
# started with), command.txt. A start waits for the node's "node up at" line in this start's part of
# the log, else exits 1 with that part's tail.
#
# Kept across starts (stop, then start with no options: same port, id, cluster, partition, checkpoint):
#   port, id, partition  of this host's node, in RUN_DIR/<id>/launch.env; RUN_DIR/default-node.<host>
#                        names that node. A new node takes port 8470 (env LAUNCH_LAN_PORT) if nothing
#                        listens on it, else one the kernel picks; its id is <hostname>-<port>.
#   cluster              a new run gets a fresh one, lan-<8 hex digits>, saved in RUN_DIR/cluster and
#                        printed: other hosts join with --cluster NAME. --cluster (here or after --) wins.
#
# Options:
#   --port P          HTTP port (a node that ran on P before is started again with its id)
#   --id ID           node id (default: this host's remembered node, else <hostname>-<port>)
#   --cluster NAME    the cluster to join (default: remembered, else a fresh lan-XXXXXXXX)
#   --partition K/N   this node's shard (default: remembered, else the node's 0/1)
#   --ip A            the address for mDNS instead of the detected LAN address (with --hosts: every
#                     host's, which only makes sense for a test on one machine, --ip 127.0.0.1)
#   --another         start a node even though one started from RUN_DIR already runs
#   --run-dir DIR     where the nodes live (default ./gossipfl-run); %h in it becomes the host name
#   --gossipfl CMD    the gossipfl executable (default .venv/bin/gossipfl of this checkout, else PATH)
#   --start-timeout S how long to wait for the node to be up (default 60)
#   --foreground      run in the foreground (exec; the log goes to node.log and the terminal)
#   --stop            SIGTERM to the node(s) started from RUN_DIR (only --id's, if given), once each is
#                     identified by its command line; waits --stop-timeout S (default 30) for them
#   --hosts H1,H2,..  instead: run this script on each host over SSH, in parallel (`localhost`: here),
#                     all in one cluster, shards K/N by position (so --partition and --id are refused).
#                     Every host needs this checkout and its .venv at --remote-dir (default: this path).
#                     Prints each host's output and commit; exit 1 if any host failed.
#   --ssh CMD         ssh command (default: ssh -o BatchMode=yes -o ConnectTimeout=10)
#   --host-timeout S  give up on a host after S seconds (default: start timeout + 60; stop: + 30)
#   --dry-run         print what would run, run nothing, change nothing
#   NODE OPTIONS      after `--` (or any option not listed above): passed to `gossipfl node`, e.g.
#                     -- --merge age --seeds 10.0.0.5:8470; they win over the defaults above.
# Exit code: 0 done; 1 a start, a stop or a host failed; 2 refused (a node runs, a taken port, a usage error).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$here/scripts/launch_lan.sh"
port="" ip="" id="" cluster="" partition="" mdns_if="" run_dir="./gossipfl-run" gossipfl=""
another=0 foreground=0 stop=0 dry_run=0 start_timeout=60 stop_timeout=30 host_timeout=""
hosts="" ssh="ssh -o BatchMode=yes -o ConnectTimeout=10" remote_dir="$here"
node_args=()

die() { echo "launch_lan: $*" >&2; exit 2; }
say() { echo "launch_lan: $*" >&2; }
need() { [ $# -ge 2 ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --port|--id|--cluster|--partition|--ip|--run-dir|--gossipfl|--start-timeout|--stop-timeout|\
        --hosts|--ssh|--remote-dir|--host-timeout)
            need "$@"; opt="${1#--}"; printf -v "${opt//-/_}" '%s' "$2"; shift 2 ;;  # --run-dir D: run_dir=D
        --another) another=1; shift ;;
        --foreground) foreground=1; shift ;;
        --stop) stop=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; node_args+=("$@"); break ;;
        *) node_args+=("$1"); shift ;;
    esac
done
gossipfl_cmd="$gossipfl" ssh_cmd="$ssh"

# Node options the launcher must know (they name the node, its directory, its cluster) are taken out of
# NODE OPTIONS; given there, they win over the launcher's options of the same name.
fanout_node_args=("${node_args[@]}")  # as given, for the other hosts
rest=()
for ((i = 0; i < ${#node_args[@]}; i++)); do
    a="${node_args[$i]}" v=""
    case "$a" in
        --id|--port|--cluster|--partition|--mdns-interface)
            [ $((i + 1)) -lt ${#node_args[@]} ] || die "$a needs a value"
            i=$((i + 1)); v="${node_args[$i]}" ;;
        --id=*|--port=*|--cluster=*|--partition=*|--mdns-interface=*) v="${a#*=}"; a="${a%%=*}" ;;
        *) rest+=("$a"); continue ;;
    esac
    case "$a" in
        --id) id="$v" ;; --port) port="$v" ;; --cluster) cluster="$v" ;; --partition) partition="$v" ;;
        --mdns-interface) mdns_if="$v" ;;
    esac
done
node_args=("${rest[@]+"${rest[@]}"}")

[ -z "$port" ] || [[ "$port" =~ ^[0-9]+$ ]] || die "--port $port: not a port number"
for t in "$start_timeout" "$stop_timeout" "${host_timeout:-1}"; do
    [[ "$t" =~ ^[0-9]+$ ]] || die "timeout $t: whole seconds expected"
done

# Print a command as a shell would read it back.
show() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }
host_short="$(hostname -s 2>/dev/null || hostname)"
host_short="$(echo "$host_short" | tr -c 'A-Za-z0-9._\n-' '-')"
new_cluster() { echo "lan-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"; }
is_local() { [ "$1" = localhost ] || [ "$1" = 127.0.0.1 ]; }

# ==== several hosts: this script on each of them, over SSH, in parallel ==============================
if [ -n "$hosts" ]; then
    IFS=',' read -r -a host_list <<<"${hosts// /}"
    n=${#host_list[@]}
    [ -z "$partition" ] || die "--partition with --hosts: the hosts get shards 0/$n..$((n - 1))/$n by position; \
to give one host its own shard, start it alone (scripts/launch_lan.sh --partition K/N --cluster NAME on it)"
    [ -z "$id" ] || die "--id with --hosts: every host needs its own id (the default <hostname>-<port> is)"
    [ "$foreground" = 0 ] || die "--foreground with --hosts: start each host in its own terminal instead"
    [ -n "$host_timeout" ] || host_timeout=$(( stop ? stop_timeout + 30 : start_timeout + 60 ))
    # shellcheck disable=SC2206  # --ssh is a command line
    ssh=($ssh_cmd)
    local_run_dir="${run_dir//%h/$host_short}"
    if [ "$stop" = 0 ] && [ -z "$cluster" ]; then
        # the run's cluster: the one these hosts got last time (their checkpoints are for it), else new
        cluster="$(cat "$local_run_dir/cluster" 2>/dev/null || true)"
        [ -n "$cluster" ] || cluster="$(new_cluster)"
    fi
    if [ "$stop" = 0 ] && [ "$dry_run" = 0 ]; then
        mkdir -p "$local_run_dir" && echo "$cluster" >"$local_run_dir/cluster"
    fi
    tmp="$(mktemp -d)"
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
    for k in "${!host_list[@]}"; do
        h="${host_list[$k]}"
        name="$(echo "${h##*@}" | tr -c 'A-Za-z0-9._\n-' '-')"
        args=(--run-dir "${run_dir//%h/$name}" --start-timeout "$start_timeout" --stop-timeout "$stop_timeout")
        if [ "$stop" = 1 ]; then args+=(--stop)
        else
            args+=(--partition "$k/$n" --cluster "$cluster")
            [ -n "$port" ] && args+=(--port "$port")
            [ -n "$ip" ] && args+=(--ip "$ip")
            [ "$another" = 1 ] && args+=(--another)
        fi
        [ -n "$gossipfl_cmd" ] && args+=(--gossipfl "$gossipfl_cmd")
        [ ${#fanout_node_args[@]} -gt 0 ] && args+=(-- "${fanout_node_args[@]}")
        remote="cd $(printf '%q' "$remote_dir") && echo \"# commit \$(git rev-parse --short HEAD 2>/dev/null \
|| echo unknown)\" && scripts/launch_lan.sh $(show "${args[@]}")"
        if [ "$dry_run" = 1 ]; then
            echo "# $h"
            if is_local "$h"; then echo "$remote"; else echo "$(show "${ssh[@]}" -n "$h") '${remote//\'/\'\\\'\'}'"; fi
            continue
        fi
        (
            rc=0
            if is_local "$h"; then timeout -k 5 "$host_timeout" bash -c "$remote" </dev/null >"$tmp/$k.out" 2>&1 || rc=$?
            else timeout -k 5 "$host_timeout" "${ssh[@]}" -n "$h" "$remote" </dev/null >"$tmp/$k.out" 2>&1 || rc=$?; fi
            echo "$rc" >"$tmp/$k.rc"
        ) &
    done
    [ "$dry_run" = 0 ] || exit 0
    # each host's output as soon as it is done, its lines prefixed with the host
    left=("${!host_list[@]}") failed=() commits=()
    while [ ${#left[@]} -gt 0 ]; do
        still=()
        for k in "${left[@]}"; do
            if [ ! -s "$tmp/$k.rc" ]; then still+=("$k"); continue; fi
            h="${host_list[$k]}" rc="$(cat "$tmp/$k.rc")"
            sed "s|^|[$h] |" "$tmp/$k.out"
            c="$(sed -n 's/^# commit \([^ ]*\)$/\1/p; T; q' "$tmp/$k.out")"
            [ -z "$c" ] || commits+=("$h $c")
            case "$rc" in
                0) ;;
                124|137) echo "[$h] FAILED: no answer within $host_timeout s (--host-timeout)"; failed+=("$h") ;;
                255) echo "[$h] FAILED: ssh could not connect or run (code 255)"; failed+=("$h") ;;
                *) echo "[$h] FAILED (code $rc)"; failed+=("$h") ;;
            esac
        done
        left=("${still[@]+"${still[@]}"}")
        [ ${#left[@]} -eq 0 ] || sleep 0.2
    done
    wait
    if [ ${#commits[@]} -gt 0 ]; then
        if [ "$(printf '%s\n' "${commits[@]}" | awk '{print $2}' | sort -u | wc -l)" -gt 1 ]; then
            echo "launch_lan: WARNING: the hosts run different commits:" "${commits[@]/%/;}"
        else
            echo "commit ${commits[0]#* } on ${#commits[@]} host(s)"
        fi
    fi
    if [ "$stop" = 0 ]; then
        echo "cluster $cluster; add a host later with: scripts/launch_lan.sh --cluster $cluster --partition K/N"
    fi
    if [ ${#failed[@]} -gt 0 ]; then echo "launch_lan: failed on ${failed[*]}" >&2; exit 1; fi
    exit 0
fi

# ==== this host ======================================================================================
run_dir="${run_dir//%h/$host_short}"
if [ -d "$run_dir" ]; then run_dir="$(cd "$run_dir" && pwd)"
else case "$run_dir" in /*) ;; *) run_dir="$PWD/${run_dir#./}" ;; esac; fi
if [ -z "$gossipfl_cmd" ]; then
    if [ -x "$here/.venv/bin/gossipfl" ]; then gossipfl_cmd="$here/.venv/bin/gossipfl"; else gossipfl_cmd="gossipfl"; fi
fi
# The node's working directory is its own directory: a relative gossipfl path must be made absolute.
case "$gossipfl_cmd" in /*) ;; */*) gossipfl_cmd="$(cd "$(dirname "$gossipfl_cmd")" && pwd)/$(basename "$gossipfl_cmd")" ;; esac
py="$(dirname "$(command -v "$gossipfl_cmd" || echo /nonexistent/x)")/python"
[ -x "$py" ] || py=python3

# A value remembered for a node: KEY from RUN_DIR/<id>/launch.env.
remembered() { [ ! -f "$run_dir/$1/launch.env" ] || sed -n "s/^$2=//p" "$run_dir/$1/launch.env" | tail -n1; }

alive() {  # PID: a running process (a zombie, exited and not yet reaped, is not)
    kill -0 "$1" 2>/dev/null || return 1
    ! grep -qs '^State:[[:space:]]*Z' "/proc/$1/status"
}
is_our_node() {  # PID ID: the process is `gossipfl node ... --id ID ...` (not a recycled pid)
    local args
    if [ -r "/proc/$1/cmdline" ]; then args="$(tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
    else args="$(ps -o args= -p "$1" 2>/dev/null | tr ' ' '\n')" || return 1; fi
    printf '%s\n' "$args" | awk -v id="$2" '
        /(^|\/)gossipfl$/ { exe = 1 }
        exe && $0 == "node" { node = 1 }
        prev == "--id" && $0 == id { ours = 1 }
        { prev = $0 }
        END { exit !(node && ours) }'
}
# The nodes started from run_dir on this host that run now, as "id pid" lines. A pid file whose process
# is gone or is not that node (a recycled pid) is removed, with a message; it is never signalled.
running_nodes() {
    local f d nid pid h
    for f in "$run_dir"/*/node.pid; do
        [ -f "$f" ] || continue
        d="$(dirname "$f")" nid="$(basename "$d")" pid="$(tr -dc 0-9 <"$f")"
        h="$(remembered "$nid" host)"
        if [ -n "$h" ] && [ "$h" != "$host_short" ]; then continue; fi  # another host's (a shared home)
        if [ -n "$pid" ] && alive "$pid" && is_our_node "$pid" "$nid"; then echo "$nid $pid"; continue; fi
        if [ "$dry_run" = 1 ]; then say "stale pid file $f (pid ${pid:-?} is not node $nid); would remove it"
        else say "stale pid file $f (pid ${pid:-?} is not node $nid): removed"; rm -f "$f"; fi
    done
}

# ---- --stop -----------------------------------------------------------------------------------------
if [ "$stop" = 1 ]; then
    mapfile -t nodes < <(running_nodes)
    targets=()
    for line in "${nodes[@]+"${nodes[@]}"}"; do
        if [ -z "$id" ] || [ "${line% *}" = "$id" ]; then targets+=("$line"); fi
    done
    if [ ${#targets[@]} -eq 0 ]; then echo "no node${id:+ $id} running from $run_dir"; exit 0; fi
    for line in "${targets[@]}"; do
        if [ "$dry_run" = 1 ]; then echo "kill -TERM ${line#* }   # node ${line% *}"; else kill -TERM "${line#* }"; fi
    done
    [ "$dry_run" = 0 ] || exit 0
    # The node finishes the exchanges in flight (up to 3 s), writes its last checkpoint, says goodbye.
    start=$SECONDS rc=0
    for line in "${targets[@]}"; do
        nid="${line% *}" pid="${line#* }"
        while alive "$pid" && [ $((SECONDS - start)) -lt "$stop_timeout" ]; do sleep 0.1; done
        if alive "$pid"; then
            say "node $nid (pid $pid) still runs $stop_timeout s after SIGTERM; see $run_dir/$nid/node.log (kill -KILL $pid to force)"
            rc=1
        else
            rm -f "$run_dir/$nid/node.pid"
            echo "stopped $nid (pid $pid)"
        fi
    done
    exit $rc
fi

# ---- start ------------------------------------------------------------------------------------------
probe_port() {  # PORT: print it if nothing listens on it (0: one the kernel picks), else fail
    # SO_REUSEADDR as the node sets it: a port in TIME_WAIT after a stop is free to the node.
    "$py" - "$1" <<'EOF'
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
    print(s.getsockname()[1])
EOF
}
lan_ip() {
    local a
    # `ip route get` asks the kernel's routing table; no packet is sent.
    a="$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n1)"
    [ -n "$a" ] || a="$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+(\.[0-9]+){3}$' | head -n1 || true)"
    echo "${a:-127.0.0.1}"
}

if [ "$dry_run" = 0 ]; then
    mkdir -p "$run_dir"
    # one launcher at a time in a run dir (the lock goes with this process; the node does not inherit it)
    exec 9>>"$run_dir/.launch.lock"
    flock -w 60 9 || die "another launch_lan.sh is busy in $run_dir"
fi
mapfile -t nodes < <(running_nodes)
pointer="$run_dir/default-node.$host_short"
stop_hint="$(show "$self" --run-dir "$run_dir" --stop)"
if [ ${#nodes[@]} -gt 0 ] && [ "$another" = 0 ]; then
    line="${nodes[0]}"
    die "node ${line% *} already runs from $run_dir (pid ${line#* }, port $(remembered "${line% *}" port)); \
stop it with: $stop_hint; or start one more with --another"
fi

# which node: --id; else the one that ran on --port; else this host's node; else a new one
if [ -z "$id" ] && [ "$another" = 0 ] && [ -s "$pointer" ]; then
    last="$(cat "$pointer")"
    if [ -z "$port" ] || [ "$(remembered "$last" port)" = "$port" ]; then id="$last"; fi
fi
[ -n "$id" ] || { [ -z "$port" ] || id="${host_short:0:50}-$port"; }
if [ -n "$id" ]; then
    for line in "${nodes[@]+"${nodes[@]}"}"; do
        [ "${line% *}" != "$id" ] || die "node $id already runs from $run_dir (pid ${line#* }); stop it with: $stop_hint --id $id"
    done
fi
if [ -z "$port" ]; then
    port="$( [ -z "$id" ] || remembered "$id" port)"
    if [ -n "$port" ]; then
        probe_port "$port" >/dev/null || die "port $port (node $id's, from $run_dir/$id/launch.env) is taken by \
another process (see: ss -ltnp 'sport = :$port'); free it, or give --port"
    else
        port="$(probe_port "${LAUNCH_LAN_PORT:-8470}" || probe_port 0)"
    fi
else
    probe_port "$port" >/dev/null || die "port $port is taken by another process (see: ss -ltnp 'sport = :$port')"
fi
[ -n "$id" ] || id="${host_short:0:50}-$port"
[ -n "$partition" ] || partition="$(remembered "$id" partition)"
fresh_cluster=0
[ -n "$cluster" ] || cluster="$(remembered "$id" cluster)"
[ -n "$cluster" ] || cluster="$(cat "$run_dir/cluster" 2>/dev/null || true)"
[ -n "$cluster" ] || { cluster="$(new_cluster)"; fresh_cluster=1; }
[ -n "$ip" ] || ip="$(lan_ip)"
[ -n "$mdns_if" ] || mdns_if="$ip"
node_dir="$run_dir/$id"

cmd=("$gossipfl_cmd" node --port "$port" --id "$id" --cluster "$cluster" --mdns-interface "$mdns_if"
     --state-dir "$run_dir")
[ -n "$partition" ] && cmd+=(--partition "$partition")
cmd+=("${node_args[@]+"${node_args[@]}"}")   # last: argparse keeps the last value, so these win

if [ "$dry_run" = 1 ]; then
    echo "cd $(printf '%q' "$node_dir")"
    if [ "$foreground" = 1 ]; then echo "exec $(show "${cmd[@]}") 2>&1 | tee -a node.log"
    else echo "nohup $(show "${cmd[@]}") >>node.log 2>&1 </dev/null & echo \$! >node.pid"; fi
    echo "# node $id at http://$ip:$port/ (mDNS on $mdns_if), cluster $cluster$( [ $fresh_cluster = 0 ] || echo ' (new)')"
    exit 0
fi

mkdir -p "$node_dir"
chmod 700 "$node_dir"  # it is also the node's checkpoint directory (the node makes it 0700 anyway)
printf '%s\n' "host=$host_short" "id=$id" "port=$port" "cluster=$cluster" "partition=$partition" >"$node_dir/launch.env"
show "${cmd[@]}" >"$node_dir/command.txt"
if [ "$another" = 0 ] || [ ! -s "$pointer" ]; then echo "$id" >"$pointer"; fi
if [ "$another" = 0 ] || [ ! -s "$run_dir/cluster" ]; then echo "$cluster" >"$run_dir/cluster"; fi
cd "$node_dir"
touch node.log
offset=$(stat -c %s node.log)  # this start's part of the log begins here
echo "==== launch_lan.sh $(date -u +%Y-%m-%dT%H:%M:%SZ): $(cat command.txt)" >>node.log

joining="  other hosts join with: $(show "$self" --cluster "$cluster")"
if [ "$foreground" = 1 ]; then
    echo "node $id at http://$ip:$port/ (mDNS on $mdns_if, cluster $cluster), log $node_dir/node.log" >&2
    [ "$fresh_cluster" = 0 ] || echo "$joining" >&2
    echo $$ >node.pid  # exec keeps the pid
    exec 9>&-
    # tee ignores Ctrl-C and SIGTERM so that it records the node's last lines as it stops
    exec > >(trap '' INT TERM; exec tee -a node.log) 2>&1
    exec "${cmd[@]}"
fi
nohup "${cmd[@]}" >>node.log 2>&1 </dev/null 9>&- &
pid=$!
echo "$pid" >node.pid
this_start() { tail -c "+$((offset + 1))" node.log; }
deadline=$((SECONDS + start_timeout)) up=0
while [ $SECONDS -lt $deadline ]; do
    if grep -q "node up at" < <(this_start); then up=1; break; fi
    alive "$pid" || break
    sleep 0.2
done
if [ "$up" = 0 ]; then
    if alive "$pid"; then
        say "node $id not up after $start_timeout s; it still runs (pid $pid), still starting or stuck; stop it with: $stop_hint"
    else
        wait "$pid" && rc=0 || rc=$?
        rm -f node.pid
        say "the node exited (code $rc)"
    fi
    say "$node_dir/node.log, this start:"
    this_start | tail -n 15 >&2
    exit 1
fi
echo "node $id at http://$ip:$port/ (pid $pid, mDNS on $mdns_if), cluster $cluster${partition:+, partition $partition}"
echo "  log:    $node_dir/node.log"
echo "  status: curl -s http://$ip:$port/v1/status | python3 -m json.tool"
if [ "$(cat "$pointer")" = "$id" ]; then
    echo "  stop:   $stop_hint   (SIGTERM; a start with no options brings it back on port $port)"
else
    echo "  stop:   $stop_hint --id $id   (SIGTERM; start it again with --another --id $id)"
fi
if [ "$fresh_cluster" = 1 ]; then echo "$joining"; fi
