#!/usr/bin/env bash
# Start a gossipfl node on this host (or one on each of several hosts over SSH) with LAN defaults,
# stop it, and start it again where it left off. docs/lan.md has the whole story.
#
#   scripts/launch_lan.sh [OPTIONS] [-- NODE OPTIONS]
#
# One node per host: a second start while a node started from RUN_DIR runs on this host is refused (exit
# 2) unless --another. The node runs in the background (nohup) with mDNS on the LAN address only (found
# with `ip route get`, which sends nothing; else `hostname -I`), its checkpoints in RUN_DIR (--state-dir),
# and everything else in RUN_DIR/<node id>/: node.log (appended), node.pid, launch.env (what it was
# started with), command.txt. A start waits for the node to be up (its "node up at" line in this start's
# part of the log, or its GET /v2/health/live answering, for a log level that hides that line), checks
# that it still runs a second later, else exits 1 with that part's tail.
#
# Kept across starts (stop, then start with no options: same port, id, cluster, partition, checkpoint):
#   port, id, partition  of this host's node, in RUN_DIR/<id>/launch.env; RUN_DIR/default-node.<host>
#                        names that node. A new node takes port 8470 (env LAUNCH_LAN_PORT) if nothing
#                        listens on it, else the first free one of 8471..8499 (the firewall range in
#                        docs/lan.md), else one the kernel picks; its id is <hostname>-<port>.
#   cluster              a new run gets a fresh one, lan-<8 hex digits>, saved in RUN_DIR/cluster and
#                        printed: other hosts join with --cluster NAME. --cluster (here or after --) wins.
#
# Options (--opt VALUE or --opt=VALUE):
#   --port P          HTTP port (a node that ran on P before is started again with its id; with --stop:
#                     stop only the node that runs on P)
#   --id ID           node id (default: this host's remembered node, else <hostname>-<port>)
#   --cluster NAME    the cluster to join (default: remembered, else a fresh lan-XXXXXXXX)
#   --partition K/N   this node's shard (default: remembered, else the node's 0/1)
#   --ip A            the address for mDNS instead of the detected LAN address (with --hosts: every
#                     host's, which only makes sense for a test on one machine, --ip 127.0.0.1)
#   --another         start a node even though one started from RUN_DIR already runs
#   --run-dir DIR     where the nodes live (default: gossipfl-run in this checkout, whatever the current
#                     directory); %h in it becomes the host name
#   --gossipfl CMD    the gossipfl executable (default .venv/bin/gossipfl of this checkout, else PATH)
#   --start-timeout S how long to wait for the node to be up (default 60)
#   --foreground      run in the foreground (exec; the log goes to node.log and the terminal)
#   --stop            SIGTERM to this host's node(s) started from RUN_DIR (only --id's or --port's, if
#                     given), once each is identified by its command line; waits --stop-timeout S
#                     (default 30) for them. Takes no node options.
#   --hosts H1,H2,..  instead: run this script on each host over SSH, in parallel (`localhost`: here),
#                     all in one cluster, shards K/N by position (so --partition and --id are refused).
#                     Every host needs this checkout and its .venv at --remote-dir (default: this path);
#                     each uses its checkout's gossipfl-run unless --run-dir is given (a relative one is
#                     relative to the checkout, on every host). Prints each host's output and commit;
#                     a host whose node already runs is reported as such, not started.
#   --remote-dir DIR  where the checkout is on the other hosts (default: this checkout's path)
#   --ssh CMD         ssh command (default: ssh -o BatchMode=yes -o ConnectTimeout=10)
#   --host-timeout S  give up on a host after S seconds (default: start timeout + 60; stop: + 30)
#   --dry-run         print what would run, run nothing, change nothing
#   NODE OPTIONS      after `--` (or any option not listed above): passed to `gossipfl node`, e.g.
#                     -- --merge age --seeds 10.0.0.5:8470; they win over the defaults above.
# Exit code: 0 done; 1 a start, a stop or a host failed; 2 refused (a node runs, a taken port, a usage
# error; with --hosts: no host failed, but on some a node already ran).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$here/scripts/launch_lan.sh"
default_run_dir="$here/gossipfl-run"
port="" ip="" id="" cluster="" partition="" mdns_if="" run_dir="" gossipfl=""
another=0 foreground=0 stop=0 dry_run=0 start_timeout=60 stop_timeout=30 host_timeout=""
default_ssh="ssh -o BatchMode=yes -o ConnectTimeout=10"
hosts="" ssh="$default_ssh" remote_dir="$here"
node_args=()

die() { echo "launch_lan: $*" >&2; exit 2; }
say() { echo "launch_lan: $*" >&2; }
need() { [ $# -ge 2 ] || die "$1 needs a value"; }
# the launcher's options that take a value: --run-dir D (or --run-dir=D) sets run_dir=D
valued=" --port --id --cluster --partition --ip --run-dir --gossipfl --start-timeout --stop-timeout --hosts \
--ssh --remote-dir --host-timeout "
set_opt() { local o="${1#--}"; printf -v "${o//-/_}" '%s' "$2"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --another) another=1; shift ;;
        --foreground) foreground=1; shift ;;
        --stop) stop=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; node_args+=("$@"); break ;;
        --*=*)
            if [[ "$valued" == *" ${1%%=*} "* ]]; then set_opt "${1%%=*}" "${1#*=}"; else node_args+=("$1"); fi
            shift ;;
        *)
            if [[ "$valued" == *" $1 "* ]]; then need "$@"; set_opt "$1" "$2"; shift 2
            else node_args+=("$1"); shift; fi ;;
    esac
done
run_dir_given=0
if [ -n "$run_dir" ]; then run_dir_given=1; else run_dir="$default_run_dir"; fi
gossipfl_cmd="$gossipfl" ssh_cmd="$ssh"

# Node options the launcher must know (they name the node, its directory, its cluster) are taken out of
# NODE OPTIONS; given there, they win over the launcher's options of the same name.
fanout_node_args=("${node_args[@]+"${node_args[@]}"}")  # as given, for the other hosts
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

# Print a command as a shell would read it back (plain words as they are: printf %q escapes a comma).
show() {
    local out="" a
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:@,=+%-]+$ ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
    done
    echo "${out% }"
}
if [ "$stop" = 1 ] && [ ${#node_args[@]} -gt 0 ]; then
    die "--stop takes no node options, got: $(show "${node_args[@]}") (a launcher option is one of:$valued\
--another --foreground --dry-run; --opt VALUE or --opt=VALUE)"
fi
[ -z "$port" ] || [[ "$port" =~ ^[0-9]+$ ]] || die "--port $port: not a port number"
[[ "${LAUNCH_LAN_PORT:-8470}" =~ ^[0-9]+$ ]] || die "LAUNCH_LAN_PORT=$LAUNCH_LAN_PORT: not a port number"
for t in "$start_timeout" "$stop_timeout" "${host_timeout:-1}"; do
    [[ "$t" =~ ^[0-9]+$ ]] || die "timeout $t: whole seconds expected"
done

host_short="$(hostname -s 2>/dev/null || hostname)"
host_short="$(echo "$host_short" | tr -c 'A-Za-z0-9._\n-' '-')"
new_cluster() { echo "lan-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"; }
is_local() { [ "$1" = localhost ] || [ "$1" = 127.0.0.1 ]; }
# FILE VALUE: write it whole (a temporary file of this host's, renamed), for a run dir that several hosts
# share (an NFS home): a reader never sees it half written
write_file() { printf '%s\n' "$2" >"$1.tmp.$host_short.$$" && mv -f "$1.tmp.$host_short.$$" "$1"; }

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
    # the run's cluster is remembered here, in this checkout's run dir (a relative --run-dir is relative to
    # the checkout, here as on the other hosts, where the command runs in --remote-dir)
    local_run_dir="${run_dir//%h/$host_short}"
    case "$local_run_dir" in /*) ;; *) local_run_dir="$here/${local_run_dir#./}" ;; esac
    if [ "$stop" = 0 ] && [ -z "$cluster" ]; then
        # the run's cluster: the one these hosts got last time (their checkpoints are for it), else new
        cluster="$(cat "$local_run_dir/cluster" 2>/dev/null || true)"
        [ -n "$cluster" ] || cluster="$(new_cluster)"
    fi
    if [ "$stop" = 0 ] && [ "$dry_run" = 0 ]; then
        mkdir -p "$local_run_dir" && write_file "$local_run_dir/cluster" "$cluster"
    fi
    # the same fan-out again, for the messages: stop these hosts' nodes
    again=("$self" --hosts "$hosts")
    [ "$run_dir_given" = 0 ] || again+=(--run-dir "$run_dir")
    [ "$remote_dir" = "$here" ] || again+=(--remote-dir "$remote_dir")
    [ "$ssh_cmd" = "$default_ssh" ] || again+=(--ssh "$ssh_cmd")
    tmp="$(mktemp -d)"
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
    for k in "${!host_list[@]}"; do
        h="${host_list[$k]}"
        name="$(echo "${h##*@}" | tr -c 'A-Za-z0-9._\n-' '-')"
        args=(--start-timeout "$start_timeout" --stop-timeout "$stop_timeout")
        # without --run-dir, each host uses its own checkout's default
        [ "$run_dir_given" = 0 ] || args+=(--run-dir "${run_dir//%h/$name}")
        [ -n "$port" ] && args+=(--port "$port")
        if [ "$stop" = 1 ]; then args+=(--stop)
        else
            args+=(--partition "$k/$n" --cluster "$cluster")
            [ -n "$ip" ] && args+=(--ip "$ip")
            [ "$another" = 1 ] && args+=(--another)
        fi
        [ -n "$gossipfl_cmd" ] && args+=(--gossipfl "$gossipfl_cmd")
        [ ${#fanout_node_args[@]} -gt 0 ] && args+=(-- "${fanout_node_args[@]}")
        remote="cd $(printf '%q' "$remote_dir") && echo \"# commit \$(git rev-parse HEAD 2>/dev/null \
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
    # each host's output as soon as it is done, its lines prefixed with the host (its commit shortened)
    left=("${!host_list[@]}") failed=() running=() commits=()
    while [ ${#left[@]} -gt 0 ]; do
        still=()
        for k in "${left[@]}"; do
            if [ ! -s "$tmp/$k.rc" ]; then still+=("$k"); continue; fi
            h="${host_list[$k]}" rc="$(cat "$tmp/$k.rc")"
            sed -E "s/^(# commit [0-9a-f]{12})[0-9a-f]{28}\$/\\1/; s|^|[$h] |" "$tmp/$k.out"
            c="$(sed -n 's/^# commit \([^ ]*\)$/\1/p; T; q' "$tmp/$k.out")"
            [ -z "$c" ] || commits+=("$h $c")  # compared in full, printed short
            # the refusal of a host whose node runs (its own launcher's message, exit 2)
            runs="$(sed -n 's/^launch_lan: node \([^ ]*\) already runs from .*(pid \([0-9]*\), port \([0-9]*\)).*/\1 (pid \2, port \3)/p' \
                "$tmp/$k.out" | head -n1)"
            case "$rc" in
                0) ;;
                124|137) echo "[$h] FAILED: no answer within $host_timeout s (--host-timeout)"; failed+=("$h") ;;
                255) echo "[$h] FAILED: ssh could not connect or run (code 255)"; failed+=("$h") ;;
                2) if [ -n "$runs" ] && [ "$stop" = 0 ]; then
                       echo "[$h] already running: $runs; not started"; running+=("$h")
                   else echo "[$h] FAILED (code $rc)"; failed+=("$h"); fi ;;
                *) echo "[$h] FAILED (code $rc)"; failed+=("$h") ;;
            esac
        done
        left=("${still[@]+"${still[@]}"}")
        [ ${#left[@]} -eq 0 ] || sleep 0.2
    done
    wait
    if [ ${#commits[@]} -gt 0 ]; then
        if [ "$(printf '%s\n' "${commits[@]}" | awk '{print $2}' | sort -u | wc -l)" -gt 1 ]; then
            short=()
            for c in "${commits[@]}"; do f="${c#* }"; short+=("${c%% *} ${f:0:12};"); done
            echo "launch_lan: WARNING: the hosts run different commits:" "${short[@]}"
        else
            c="${commits[0]#* }"
            echo "commit ${c:0:12} on ${#commits[@]} host(s)"
        fi
    fi
    if [ "$stop" = 0 ]; then
        echo "cluster $cluster; add a host later with: scripts/launch_lan.sh --cluster $cluster --partition K/N"
    fi
    if [ ${#running[@]} -gt 0 ]; then
        say "not started on ${running[*]}: a node already runs there (kept as it is); stop them with: \
$(show "${again[@]}" --stop), or start one more on each with --another"
    fi
    if [ ${#failed[@]} -gt 0 ]; then say "failed on ${failed[*]}"; exit 1; fi
    [ ${#running[@]} -eq 0 ] || exit 2
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
bin_dir="$(dirname "$(command -v "$gossipfl_cmd" || echo /nonexistent/x)")"
py="$bin_dir/python"
[ -x "$py" ] || py=python3
if [ -x "$bin_dir/gossipfl-healthcheck" ]; then healthcheck=("$bin_dir/gossipfl-healthcheck")
else healthcheck=("$py" -m gossipfl.common.healthcheck); fi
# the command that stops this run dir's nodes, for the messages
if [ "$run_dir" = "$default_run_dir" ]; then stop_hint="$(show "$self" --stop)"
else stop_hint="$(show "$self" --run-dir "$run_dir" --stop)"; fi

# One launcher at a time per host in a run dir: the lock file is this host's, for a run dir that several
# hosts share. It goes with this process (the node does not inherit it); a start holds it until its node
# is up, a stop until its nodes are gone.
lock() {
    mkdir -p "$run_dir"
    exec 9>>"$run_dir/.launch.lock.$host_short"
    flock -w $((start_timeout + 30)) 9 || die "another launch_lan.sh is busy in $run_dir on this host \
($(show "$run_dir/.launch.lock.$host_short"))"
}

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
    if [ ! -d "$run_dir" ]; then echo "no node running from $run_dir (no such directory)"; exit 0; fi
    [ "$dry_run" = 1 ] || lock
    mapfile -t nodes < <(running_nodes)
    targets=()
    for line in "${nodes[@]+"${nodes[@]}"}"; do
        if [ -n "$id" ] && [ "${line% *}" != "$id" ]; then continue; fi
        if [ -n "$port" ] && [ "$(remembered "${line% *}" port)" != "$port" ]; then continue; fi
        targets+=("$line")
    done
    if [ ${#targets[@]} -eq 0 ]; then echo "no node${id:+ $id}${port:+ on port $port} running from $run_dir"; exit 0; fi
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
probe_port() {  # PORT...: print the first one nothing listens on (0: one the kernel picks), else fail
    # SO_REUSEADDR as the node sets it: a port in TIME_WAIT after a stop is free to the node.
    "$py" - "$@" <<'EOF'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except (OSError, OverflowError):
            continue
        print(s.getsockname()[1])
        sys.exit(0)
sys.exit(1)
EOF
}
lan_ip() {
    local a
    # `ip route get` asks the kernel's routing table; no packet is sent.
    a="$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n1)"
    [ -n "$a" ] || a="$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+(\.[0-9]+){3}$' | head -n1 || true)"
    echo "${a:-127.0.0.1}"
}

[ "$dry_run" = 1 ] || lock
mapfile -t nodes < <(running_nodes)
pointer="$run_dir/default-node.$host_short"
if [ ${#nodes[@]} -gt 0 ] && [ "$another" = 0 ]; then
    line="${nodes[0]}"  # (--hosts reads this message)
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
        [ "${line% *}" != "$id" ] || die "node $id already runs from $run_dir (pid ${line#* }, port $(remembered "$id" port)); \
stop it with: $stop_hint --id $id"
    done
fi
if [ -z "$port" ]; then
    port="$( [ -z "$id" ] || remembered "$id" port)"
    if [ -n "$port" ]; then
        probe_port "$port" >/dev/null || die "port $port (node $id's, from $run_dir/$id/launch.env) is taken by \
another process (see: ss -ltnp 'sport = :$port'); free it, or give --port"
    else
        # the preferred port, else the first free one of the next 29 (one firewall rule covers them all),
        # else one the kernel picks
        pref="${LAUNCH_LAN_PORT:-8470}" range=("${LAUNCH_LAN_PORT:-8470}")
        if [ "$pref" != 0 ]; then for ((p = pref + 1; p <= pref + 29 && p <= 65535; p++)); do range+=("$p"); done; fi
        if ! port="$(probe_port "${range[@]}")"; then
            port="$(probe_port 0)" || die "found no free port"
            say "ports $pref..$((pref + 29)) are all taken: port $port, picked by the kernel, which the firewall \
rules in docs/lan.md do not open (--port P to choose one)"
        fi
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

# The health check asks the node where it listens: its port, its --host, https with --tls-cert (the last
# one given wins, as in the node). Settings from a --config file or GOSSIPFL_* variables: as inherited.
check_env=(GOSSIPFL_PORT="$port") scheme=http
for ((i = 0; i < ${#node_args[@]}; i++)); do
    a="${node_args[$i]}" v="${node_args[$((i + 1))]:-}"
    case "$a" in
        --host) check_env+=(GOSSIPFL_HOST="$v") ;;
        --host=*) check_env+=(GOSSIPFL_HOST="${a#*=}") ;;
        --tls-cert) check_env+=(GOSSIPFL_TLS_CERT="$v"); scheme=https ;;
        --tls-cert=*) check_env+=(GOSSIPFL_TLS_CERT="${a#*=}"); scheme=https ;;
    esac
done
is_live() { env "${check_env[@]}" "${healthcheck[@]}" --timeout 1 >/dev/null 2>&1 </dev/null 9>&-; }

if [ "$dry_run" = 1 ]; then
    echo "cd $(printf '%q' "$node_dir")"
    if [ "$foreground" = 1 ]; then echo "exec $(show "${cmd[@]}") 2>&1 | tee -a node.log"
    else echo "nohup $(show "${cmd[@]}") >>node.log 2>&1 </dev/null & echo \$! >node.pid"; fi
    echo "# node $id at $scheme://$ip:$port/ (mDNS on $mdns_if), cluster $cluster$( [ $fresh_cluster = 0 ] || echo ' (new)')"
    exit 0
fi

mkdir -p "$node_dir"
chmod 700 "$node_dir"  # it is also the node's checkpoint directory (the node makes it 0700 anyway)
printf '%s\n' "host=$host_short" "id=$id" "port=$port" "cluster=$cluster" "partition=$partition" >"$node_dir/launch.env"
show "${cmd[@]}" >"$node_dir/command.txt"
if [ "$another" = 0 ] || [ ! -s "$pointer" ]; then echo "$id" >"$pointer"; fi
if [ "$another" = 0 ] || [ ! -s "$run_dir/cluster" ]; then write_file "$run_dir/cluster" "$cluster"; fi
cd "$node_dir"
touch node.log
offset=$(stat -c %s node.log)  # this start's part of the log begins here
echo "==== launch_lan.sh $(date -u +%Y-%m-%dT%H:%M:%SZ): $(cat command.txt)" >>node.log

joining="  other hosts join with: $(show "$self" --cluster "$cluster")"
if [ "$foreground" = 1 ]; then
    echo "node $id at $scheme://$ip:$port/ (mDNS on $mdns_if, cluster $cluster), log $node_dir/node.log" >&2
    [ "$fresh_cluster" = 0 ] || echo "$joining" >&2
    echo $$ >node.pid  # exec keeps the pid
    # The lock is held until the exec: by then the pid is the node's (fd 9 is closed by the exec itself,
    # and not inherited by tee, which ignores Ctrl-C and SIGTERM to record the node's last lines).
    exec > >(trap '' INT TERM; exec tee -a node.log 9>&-) 2>&1
    exec "${cmd[@]}" 9>&-
fi
nohup "${cmd[@]}" >>node.log 2>&1 </dev/null 9>&- &
pid=$!
echo "$pid" >node.pid
this_start() { tail -c "+$((offset + 1))" node.log; }
now_ms() {  # milliseconds, into $now (EPOCHREALTIME: bash 5; its decimal point depends on the locale)
    local t="${EPOCHREALTIME:-}"; t="${t//[!0-9]/}"
    if [ -n "$t" ]; then now=$((10#$t / 1000)); else now=$((SECONDS * 1000)); fi
}
# Up: its "node up at" line, or its health check answering (every 0.4 s) while a log level above info
# hides that line. Then it must still run 1 s after that line (2 s after a health check alone, so that a
# failure of the discovery, which starts after the HTTP server, is seen).
deadline=$((SECONDS + start_timeout)) up_at="" live_at="" ok=0 n=0 now=0
while alive "$pid"; do
    now_ms
    if [ -z "$up_at" ] && grep -q "node up at" < <(this_start); then up_at=$now; fi
    if [ -z "$up_at$live_at" ] && [ $((n % 2)) = 1 ] && is_live; then live_at=$now; fi
    if { [ -n "$up_at" ] && [ $((now - up_at)) -ge 1000 ]; } || { [ -n "$live_at" ] && [ $((now - live_at)) -ge 2000 ]; }
    then ok=1; break; fi
    [ -n "$up_at$live_at" ] || [ $SECONDS -lt $deadline ] || break
    n=$((n + 1))
    sleep 0.2
done
if [ "$ok" = 0 ]; then
    if alive "$pid"; then
        say "node $id not up after $start_timeout s; it still runs (pid $pid), still starting or stuck; stop it with: $stop_hint"
    else
        wait "$pid" && rc=0 || rc=$?
        rm -f node.pid
        if [ -n "$up_at$live_at" ]; then say "the node exited (code $rc) right after it was up"
        else say "the node exited (code $rc)"; fi
    fi
    say "$node_dir/node.log, this start:"
    this_start | tail -n 15 >&2
    exit 1
fi
echo "node $id at $scheme://$ip:$port/ (pid $pid, mDNS on $mdns_if), cluster $cluster${partition:+, partition $partition}"
echo "  log:    $node_dir/node.log"
echo "  status: curl -s$([ "$scheme" = http ] || echo k) $scheme://$ip:$port/v1/status | python3 -m json.tool"
if [ "$(cat "$pointer")" = "$id" ]; then
    echo "  stop:   $stop_hint   (SIGTERM; a start with no options brings it back on port $port)"
else
    echo "  stop:   $stop_hint --id $id   (SIGTERM; start it again with --another --id $id)"
fi
if [ "$fresh_cluster" = 1 ]; then echo "$joining"; fi
