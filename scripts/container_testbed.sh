#!/usr/bin/env bash
# Container testbed (not part of CI): build the image from docker/Dockerfile with podman, run N node
# containers on a podman bridge network, let them train and gossip for a while, then check that they
# agree and that they stop cleanly on SIGTERM.
#
#   scripts/container_testbed.sh [--nodes N] [--duration S] [--discovery mdns|dns|both] [--keep]
#                                [--no-build | --build-only] [--image NAME] [--base IMAGE] [--tolerance T]
#                                [--out FILE] [--secure | --compose] [-- NODE OPTIONS as GOSSIPFL_*=VALUE ...]
#
# Per discovery mode (mdns, then dns with --discovery both, the default):
#   - a podman network gossipfl-tb-<mode> (--internal: no route out of this host), N containers
#     gossipfl-tb-<mode>-<i>, i = 1..N, hostname = name, each with GOSSIPFL_PARTITION=auto/N
#     (shard i mod N, from the ordinal in its hostname, as for StatefulSet pods);
#     mdns: GOSSIPFL_DISCOVERY=mdns, mDNS on the container's own interface, i.e. on that network only;
#     dns:  GOSSIPFL_DISCOVERY=dns, GOSSIPFL_DNS_NAME=gossipfl-nodes, the network alias all share;
#   - waits until every node answers and knows the N-1 others, runs DURATION seconds, reads every
#     node's /v1/status from this host (bridge addresses; published ports when rootless), checks
#     /v2/health/ready and the image's HEALTHCHECK, prints accuracy per node and the spread
#     (fails when max - min > TOLERANCE, default 0.02);
#   - `podman stop` (SIGTERM), checks every exit code is 0, keeps the logs under
#     benchmarks/results/container_testbed/<mode>/, removes containers and network (unless --keep).
# --secure: a cluster key and a read token, made for this run, mounted read-only from files into every
#   container (GOSSIPFL_SECRET_FILE, GOSSIPFL_READ_TOKEN_FILE; this host reads status with the token),
#   and one more container, <mode>-intruder, with another key: every node must list it under ignored
#   peers, and it must merge nothing.
# --compose: the replicas are those of docker/compose.yaml itself (with docker/compose.dns.yaml in dns
#   mode), started with `podman-compose up -d` (project gossipfl-tb-<mode>, NODES=N, the image built
#   here); its healthcheck, restart policy, log settings and state volume are the file's. Instead of one
#   restart, every replica is recreated (`down`, then `up -d`: new containers, the same volume) and
#   must resume from its own checkpoint. Needs podman-compose (PATH, else .venv/bin; `pip install
#   podman-compose`). Results go to benchmarks/results/compose_testbed.md unless --out is given.
# The tables go to benchmarks/results/container_testbed.md (--out). Exit 0 only if every check passed.
#
# Base image: --base, else python:3.11-slim when it is already present locally, else
# localhost/gossipfl-base:bookworm (built with mmdebstrap from this machine's Debian sources when
# missing and mmdebstrap is installed), else python:3.11-slim (pulled). Machine-specific build mounts
# are applied only where their paths exist: the CA bundle named by $PIP_CERT and a torch wheel folder
# named by $PIP_FIND_LINKS (then torch comes from there, not from download.pytorch.org).
# PODMAN overrides the podman command (default: podman; as root without systemd, e.g. in a CI
# container: podman --runtime runc --cgroup-manager cgroupfs with a containers.conf without default
# ulimits, and builds with --isolation=chroot).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

nodes=4 duration=60 discovery=both keep=0 build=1 build_only=0 image=localhost/gossipfl:testbed base="" tolerance=0.02 secure=0 compose=0
out=benchmarks/results/container_testbed.md
extra_env=()
die() { echo "container_testbed: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --discovery) discovery="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        --no-build) build=0; shift ;;
        --build-only) build_only=1; shift ;;
        --image) image="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        --tolerance) tolerance="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --secure) secure=1; shift ;;
        --compose) compose=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra_env=("$@"); break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
if [ "$compose" = 1 ]; then
    [ "$secure" = 0 ] || die "--compose and --secure: not together (docker/compose.secure.yaml is tried by hand)"
    [ "$out" = benchmarks/results/container_testbed.md ] && out=benchmarks/results/compose_testbed.md
    PC=(podman-compose)
    command -v podman-compose >/dev/null || PC=(.venv/bin/podman-compose)
    [ -x "${PC[0]}" ] || command -v "${PC[0]}" >/dev/null || die "podman-compose is not installed (.venv/bin/pip install podman-compose)"
fi
case "$discovery" in mdns) modes=(mdns) ;; dns) modes=(dns) ;; both) modes=(mdns dns) ;;
    *) die "--discovery: mdns, dns or both" ;; esac
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes: a positive integer"
for e in "${extra_env[@]}"; do [[ "$e" == GOSSIPFL_*=* ]] || die "after --: GOSSIPFL_OPTION=VALUE, not $e"; done
command -v podman >/dev/null || die "podman is not installed (apt-get install podman)"

work="$(mktemp -d /tmp/gossipfl-testbed.XXXXXX)"
results_dir="benchmarks/results/container_testbed"
[ "$compose" = 1 ] && results_dir="benchmarks/results/compose_testbed"
mkdir -p "$results_dir"
if [ "$secure" = 1 ]; then  # secrets of this run only, readable by the containers' user (uid 10001)
    mkdir -p "$work/secrets"
    head -c 32 /dev/urandom >"$work/secrets/cluster.key"
    head -c 32 /dev/urandom >"$work/secrets/intruder.key"
    TB_TOKEN="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    export TB_TOKEN
    printf '%s\n' "$TB_TOKEN" >"$work/secrets/read-token"
    chmod 755 "$work/secrets" && chmod 444 "$work/secrets"/*
fi

# ---- podman on this host ------------------------------------------------------------------------
run_flags=() build_flags=()
if [ -n "${PODMAN:-}" ]; then
    read -r -a P <<<"$PODMAN"
elif [ "$(id -u)" = 0 ] && [ ! -d /run/systemd/system ]; then
    # root without systemd (a VM or CI container): no systemd cgroups, no crun, and container ulimits
    # above the host's fail; RUN steps need chroot isolation.
    P=(podman --cgroup-manager cgroupfs)
    command -v crun >/dev/null || P+=(--runtime runc)
    if [ -z "${CONTAINERS_CONF:-}" ]; then
        printf '[containers]\ndefault_ulimits = []\n' >"$work/containers.conf"
        export CONTAINERS_CONF="$work/containers.conf"
    fi
    run_flags+=(--ulimit host --health-interval disable)  # no systemd timers: health is checked by hand
    build_flags+=(--isolation=chroot)
else
    P=(podman)
fi
rootless=0; [ "$(id -u)" = 0 ] || rootless=1

containers=()
# shellcheck disable=SC2329  # called by the EXIT trap
cleanup() {
    if [ "$keep" = 0 ]; then
        [ ${#containers[@]} -gt 0 ] && "${P[@]}" rm -f -v -t 0 "${containers[@]}" >/dev/null 2>&1 || true
        for m in "${modes[@]}"; do
            [ "$compose" = 1 ] && compose_cmd "$m" down -v -t 0 >/dev/null 2>&1
            "${P[@]}" network rm -f "gossipfl-tb-$m" >/dev/null 2>&1 || true
        done
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- image --------------------------------------------------------------------------------------
have_image() { "${P[@]}" image exists "$1"; }
if [ "$build" = 1 ]; then
    if [ -z "$base" ]; then
        if have_image python:3.11-slim; then base=python:3.11-slim
        elif have_image localhost/gossipfl-base:bookworm; then base=localhost/gossipfl-base:bookworm
        elif command -v mmdebstrap >/dev/null && [ -f /etc/apt/sources.list.d/debian.sources ]; then
            echo "== building the base image localhost/gossipfl-base:bookworm with mmdebstrap (no registry needed)"
            mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip bookworm \
                "$work/base.tar" </etc/apt/sources.list.d/debian.sources
            "${P[@]}" import --change 'CMD ["python3"]' "$work/base.tar" localhost/gossipfl-base:bookworm >/dev/null
            rm -f "$work/base.tar"
            base=localhost/gossipfl-base:bookworm
        else
            base=python:3.11-slim
        fi
    fi
    build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
                --build-arg "VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' gossipfl/version.py)")
    # Machine-specific build inputs reach pip through a stand-in for root's home (pip reads
    # ~/.config/pip/pip.conf): files mounted onto /root leave nothing behind in the image.
    home="$work/build-home" pip_conf=""
    mkdir -p "$home/.config/pip"
    if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then  # this host's CA bundle
        : >"$home/host-ca.crt"
        build_flags+=(-v "$PIP_CERT:/root/host-ca.crt:ro"); pip_conf+=$'cert = /root/host-ca.crt\n'
    fi
    if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ] && compgen -G "$PIP_FIND_LINKS/torch-*.whl" >/dev/null; then
        # a local folder with the CPU torch wheel: no extra index needed
        mkdir -p "$home/host-wheels"
        build_flags+=(-v "$PIP_FIND_LINKS:/root/host-wheels:ro"); pip_conf+=$'find-links = /root/host-wheels\n'
        build_args+=(--build-arg "TORCH_INDEX=")
    fi
    if [ -n "$pip_conf" ]; then
        printf '[global]\n%s' "$pip_conf" >"$home/.config/pip/pip.conf"
        build_flags=(-v "$home:/root" "${build_flags[@]}")
    fi
    echo "== building $image from docker/Dockerfile (base $base)"
    t0=$SECONDS
    "${P[@]}" build "${build_flags[@]}" --format docker -f docker/Dockerfile -t "$image" "${build_args[@]}" . \
        >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log" >&2; die "image build failed"; }
    echo "   built in $((SECONDS - t0)) s, $("${P[@]}" image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}')"
fi
[ "$build_only" = 1 ] && exit 0
have_image "$image" || die "no image $image (drop --no-build)"
image_id="$("${P[@]}" image inspect -f '{{.Id}}' "$image" | cut -c1-12)"

# What the package in the image supports (the image may predate auto/N or DNS discovery).
probe() { "${P[@]}" run --rm --network none "${run_flags[@]}" --entrypoint python3 "$image" -c "$1" >/dev/null 2>&1; }
auto_ok=0; probe "from gossipfl.config import parse_partition; parse_partition('auto/2')" && auto_ok=1
dns_ok=0; probe "from gossipfl.config import NodeConfig; NodeConfig(discovery=('dns',), dns_name='x')" && dns_ok=1
[ "$auto_ok" = 1 ] || echo "!! this image's gossipfl has no --partition auto/N: FALLBACK to explicit K/N per container"

# ---- the measuring side (runs on this host, talks HTTP to the containers) ------------------------
cat >"$work/tb.py" <<'EOF'
import json, sys, time, urllib.request

import os

def get(url, timeout=3.0):
    token = os.environ.get("TB_TOKEN")  # --secure: the nodes' read token
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")

def status(url):
    try:
        return get(url + "/v1/status")[1]
    except Exception:
        return None

def wait(nodes, timeout):
    """Until every node answers and knows all others (alive); prints the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = [status(u) for u in nodes.values()]
        if all(st) and all(sum(1 for p in s["peers"] if p.get("alive", True)) >= len(nodes) - 1 for s in st):
            print(f"{time.monotonic() - t0:.1f}")
            return 0
        time.sleep(0.5)
    for name, u in nodes.items():
        s = status(u)
        print(f"  {name}: " + ("no answer" if s is None else f"{len(s['peers'])} peers"), file=sys.stderr)
    return 1

def progress(nodes):
    accs = [(s or {}).get("metrics", {}).get("accuracy") for s in map(status, nodes.values())]
    accs = [a for a in accs if a is not None]
    if accs:
        print(f"   accuracy min {min(accs):.4f} max {max(accs):.4f}", flush=True)

def collect(nodes, out):
    rows = []
    for name, u in nodes.items():
        s = status(u) or {}
        try:
            ready = get(u + "/v2/health/ready")[0] == 200
        except Exception:
            ready = False
        m, ex = s.get("metrics") or {}, s.get("exchanges") or {}
        rows.append({
            "container": name, "id": s.get("id"), "partition": s.get("partition"),
            "partition_from": s.get("partition_from"), "samples": s.get("samples"),
            "peers": sum(1 for p in s.get("peers", []) if p.get("alive", True)),
            "accuracy": m.get("accuracy"), "loss": m.get("loss"), "age": s.get("age"), "ready": ready,
            "exchanges": ex,
        })
    json.dump(rows, open(out, "w"), indent=1)

def intruder(nodes, url):
    """--secure: every node lists the intruder under ignored peers, and the intruder merged nothing."""
    s = status(url) or {}
    iid, problems = s.get("id"), []
    if s.get("merges") != 0:
        problems.append(f"the intruder merged {s.get('merges')} models")
    where = url.split("://", 1)[1]  # a probe that was refused knows the intruder by its address only
    for name, u in nodes.items():
        ignored = (status(u) or {}).get("ignored_peers", [])
        if not any(p["id"] == iid or p["url"].endswith("://" + where) for p in ignored):
            problems.append(f"{name} does not ignore the intruder {iid}")
    print(f"   intruder {iid}: merges {s.get('merges')}, ignored by "
          f"{len(nodes) - sum('does not ignore' in p for p in problems)}/{len(nodes)} nodes")
    for p in problems:
        print("!! " + p, file=sys.stderr)
    return 1 if problems else 0

def restarted(url, before, timeout, out):
    """After a restart: the node answers, resumed from its checkpoint, with an age at least ``before``."""
    t0, s = time.monotonic(), None
    while time.monotonic() - t0 < timeout and s is None:
        s = status(url)
        time.sleep(0.5)
    cp = (s or {}).get("checkpoint") or {}
    row = {"age_before": before, "age_after": (s or {}).get("age"), "resumed": cp.get("resumed"),
           "resumed_from": cp.get("resumed_from"), "seconds": round(time.monotonic() - t0, 1)}
    json.dump(row, open(out, "w"))
    ok = bool(cp.get("resumed")) and (row["age_after"] or 0) >= before
    print(f"   restart: {'resumed' if cp.get('resumed') else 'NOT resumed'} from age "
          f"{(cp.get('resumed_from') or {}).get('age')} (age {before} before the stop, {row['age_after']} after)")
    return 0 if ok else 1

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "age":
        print((status(args[0]) or {}).get("age", -1))
    if cmd == "restarted":
        sys.exit(restarted(args[0], int(args[1]), float(args[2]), args[3]))
    if cmd == "wait":
        sys.exit(wait(json.loads(args[0]), float(args[1])))
    if cmd == "progress":
        progress(json.loads(args[0]))
    if cmd == "collect":
        collect(json.loads(args[0]), args[1])
    if cmd == "intruder":
        sys.exit(intruder(json.loads(args[0]), args[1]))
EOF

cat >"$work/report.py" <<'EOF'
import json, sys
rows, stops, mode, tol, out = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3], float(sys.argv[4]), sys.argv[5]
health = json.load(open(sys.argv[6]))
def ok_ex(e):
    return e.get("ok", e.get("completed", "?")) if isinstance(e, dict) else "?"
def failed_ex(e):
    return e.get("failed", "?") if isinstance(e, dict) else "?"
lines = ["| container | node id | partition | samples | peers | accuracy | loss | exchanges ok | failed | ready | healthcheck | exit code |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
    loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
    part = f"{r['partition']}" + (f" (from {r['partition_from']})" if r.get("partition_from") else "")
    lines.append(f"| {r['container']} | {r['id']} | {part} | {r['samples']} | {r['peers']} | {acc} | {loss} | "
                 f"{ok_ex(r['exchanges'])} | {failed_ex(r['exchanges'])} | {r['ready']} | {health.get(r['container'])} | "
                 f"{stops.get(r['container'])} |")
accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
problems = []
if len(accs) < len(rows):
    problems.append("a node reported no accuracy")
spread = max(accs) - min(accs) if accs else float("nan")
if not accs or spread > tol:
    problems.append(f"accuracy spread {spread:.4f} > {tol}")
shards = [r["partition"] for r in rows]
if len(set(shards)) != len(shards):
    problems.append(f"partitions not distinct: {shards}")
if any(r["peers"] < len(rows) - 1 for r in rows):
    problems.append("a node does not know all others")
if any(not r["ready"] for r in rows):
    problems.append("a node is not ready")
if any(h != "healthy" for h in health.values()):
    problems.append("a healthcheck failed")
if any(c != 0 for c in stops.values()):
    problems.append(f"exit codes after SIGTERM: {stops}")
summary = (f"mean {sum(accs)/len(accs):.4f}, min {min(accs):.4f}, max {max(accs):.4f}, spread {spread:.4f} "
           f"(tolerance {tol})") if accs else "no accuracy"
verdict = "PASS" if not problems else "FAIL: " + "; ".join(problems)
text = "\n".join(lines) + f"\n\n{summary}\n\n**{mode}: {verdict}**\n"
open(out, "w").write(text)
print(text)
sys.exit(0 if not problems else 1)
EOF

# ---- one discovery mode -------------------------------------------------------------------------
# The URL this host reaches a container's node at: its address on the network, or (rootless, where the
# host cannot reach bridge addresses) the port published on 127.0.0.1.
url_of() {  # NAME NETWORK
    if [ "$rootless" = 1 ]; then echo "http://$("${P[@]}" port "$1" 8470 | head -n1)"
    else echo "http://$("${P[@]}" inspect -f "{{(index .NetworkSettings.Networks \"$2\").IPAddress}}" "$1"):8470"; fi
}

# podman-compose on docker/compose.yaml (+ compose.dns.yaml in dns mode), project gossipfl-tb-<mode>,
# with this host's podman flags.
compose_cmd() {  # MODE ARGS...
    local mode="$1" files=(-f docker/compose.yaml)
    shift
    [ "$mode" = dns ] && files+=(-f docker/compose.dns.yaml)
    NODES="$nodes" GOSSIPFL_IMAGE="$image" GOSSIPFL_CLUSTER="testbed-$mode" GOSSIPFL_CHECKPOINT_INTERVAL=5 \
        "${PC[@]}" --podman-path "${P[0]}" ${P[1]:+--podman-args="${P[*]:1}"} \
        ${run_flags[0]:+--podman-run-args="${run_flags[*]}"} -p "gossipfl-tb-$mode" "${files[@]}" "$@"
}

# Launch the N containers of one mode with compose; sets names and net.
launch_compose() {  # MODE
    local mode="$1" i
    compose_cmd "$mode" down -v -t 0 >/dev/null 2>&1 || true
    compose_cmd "$mode" up -d >"$work/compose-up.log" 2>&1 || { tail -n 20 "$work/compose-up.log" >&2; return 1; }
    net="gossipfl-tb-${mode}_gossip"
    names=()
    for i in $(seq 1 "$nodes"); do names+=("gossipfl-tb-${mode}_node_$i"); done
    for name in "${names[@]}"; do
        "${P[@]}" container exists "$name" || { echo "!! compose made no container $name" >&2; return 1; }
        containers+=("$name")
    done
}

run_mode() {
    local mode="$1" net="gossipfl-tb-$1" alias_name=gossipfl-nodes i name
    local -A urls=()
    local names=()
    echo
    if [ "$compose" = 1 ]; then
        echo "== $mode: docker/compose.yaml$([ "$mode" = dns ] && echo " + compose.dns.yaml") with podman-compose, NODES=$nodes, ${duration} s"
        launch_compose "$mode" || return 1
    else
        echo "== $mode: $nodes nodes on podman network $net, ${duration} s"
        for i in $(seq 1 "$nodes"); do names+=("gossipfl-tb-$mode-$i"); done
        "${P[@]}" rm -f -v -t 0 "${names[@]}" >/dev/null 2>&1 || true
        "${P[@]}" network rm -f "$net" >/dev/null 2>&1 || true
        local net_flags=()
        # --internal: no route out of this host. (Rootless, the host reaches containers by published ports
        # instead.) DNS stays on in both modes: an internal network without DNS gets no host-side gateway
        # address (netavark 1.4), so this host could not reach the nodes; in mdns mode no node asks it.
        [ "$rootless" = 0 ] && net_flags+=(--internal)
        "${P[@]}" network create "${net_flags[@]}" "$net" >/dev/null

        local env=(-e GOSSIPFL_DISCOVERY="$mode" -e GOSSIPFL_CLUSTER="testbed-$mode" -e GOSSIPFL_LOG_LEVEL=info
                   -e GOSSIPFL_STATE_DIR=/var/lib/gossipfl -e GOSSIPFL_CHECKPOINT_INTERVAL=5)
        [ "$mode" = dns ] && env+=(-e "GOSSIPFL_DNS_NAME=$alias_name" -e GOSSIPFL_DNS_INTERVAL=2)
        for e in "${extra_env[@]}"; do env+=(-e "$e"); done
        local secrets=() intruder_url=""
        if [ "$secure" = 1 ]; then
            secrets=(-v "$work/secrets:/run/secrets/gossipfl:ro" -e GOSSIPFL_SECRET_FILE=/run/secrets/gossipfl/cluster.key
                     -e GOSSIPFL_READ_TOKEN_FILE=/run/secrets/gossipfl/read-token)
            env+=("${secrets[@]}")
        fi
        for i in $(seq 1 "$nodes"); do
            name="gossipfl-tb-$mode-$i"
            local part="auto/$nodes"
            [ "$auto_ok" = 1 ] || part="$((i % nodes))/$nodes"   # FALLBACK: explicit shard per container
            local flags=(--name "$name" --hostname "$name" --network "$net" "${run_flags[@]}")
            [ "$mode" = dns ] && flags+=(--network-alias "$alias_name")
            [ "$rootless" = 1 ] && flags+=(-p 127.0.0.1::8470)
            # (stderr kept aside: podman without systemd complains that it cannot time the healthcheck)
            "${P[@]}" run -d "${flags[@]}" "${env[@]}" -e GOSSIPFL_PARTITION="$part" "$image" >/dev/null 2>"$work/run.err" \
                || { cat "$work/run.err" >&2; return 1; }
            containers+=("$name")
        done
        if [ "$secure" = 1 ]; then  # same network, same token, another cluster key
            name="gossipfl-tb-$mode-intruder"
            local flags=(--name "$name" --hostname "$name" --network "$net" "${run_flags[@]}")
            [ "$mode" = dns ] && flags+=(--network-alias "$alias_name")
            [ "$rootless" = 1 ] && flags+=(-p 127.0.0.1::8470)
            "${P[@]}" run -d "${flags[@]}" "${env[@]}" -e GOSSIPFL_SECRET_FILE=/run/secrets/gossipfl/intruder.key \
                -e GOSSIPFL_PARTITION="0/$nodes" "$image" >/dev/null 2>"$work/run.err" || { cat "$work/run.err" >&2; return 1; }
            containers+=("$name")
            intruder_url="$(url_of "$name" "$net")"
        fi
    fi
    for name in "${names[@]}"; do urls[$name]="$(url_of "$name" "$net")"; done
    local nodes_json="{" sep=""
    for name in "${names[@]}"; do nodes_json+="$sep\"$name\": \"${urls[$name]}\""; sep=", "; done
    nodes_json+="}"

    local t_up
    if ! t_up="$(python3 "$work/tb.py" wait "$nodes_json" 120)"; then
        echo "!! $mode: the nodes did not all find each other within 120 s" >&2
        for name in "${names[@]}"; do echo "--- $name"; "${P[@]}" logs --tail 5 "$name" 2>&1; done >&2
        return 1
    fi
    echo "   all $nodes nodes up and known to each other after ${t_up} s (after the containers started)"
    local t_end=$((SECONDS + ${duration%.*}))
    while [ $SECONDS -lt $t_end ]; do
        sleep $(( t_end - SECONDS < 10 ? t_end - SECONDS : 10 ))
        python3 "$work/tb.py" progress "$nodes_json"
    done
    python3 "$work/tb.py" collect "$nodes_json" "$work/$mode-rows.json"
    local intruder_ok=0
    if [ "$secure" = 1 ]; then
        python3 "$work/tb.py" intruder "$nodes_json" "$intruder_url" || intruder_ok=1
        "${P[@]}" rm -f -v -t 0 "gossipfl-tb-$mode-intruder" >/dev/null 2>&1 || true
    fi

    local restart_ok=0 first="${names[0]}" age_before
    local -A ages=()
    for name in "${names[@]}"; do ages[$name]="$(python3 "$work/tb.py" age "${urls[$name]}")"; done
    age_before="${ages[$first]}"
    if [ "$compose" = 1 ]; then
        # every replica recreated (down: SIGTERM and remove; up: new containers, same state volume); the
        # first one's row goes to the table, every one must have resumed from its own checkpoint
        compose_cmd "$mode" down -t 30 >/dev/null 2>&1 && compose_cmd "$mode" up -d >/dev/null 2>&1 || restart_ok=1
        for name in "${names[@]}"; do urls[$name]="$(url_of "$name" "$net")"; done
        for name in "${names[@]:1}"; do
            python3 "$work/tb.py" restarted "${urls[$name]}" "${ages[$name]}" 60 "$work/$mode-restart-$name.json" \
                || restart_ok=1
        done
    else
        # a restart (podman stop: SIGTERM, then start): the node resumes from its checkpoint on its volume
        "${P[@]}" stop -t 30 "$first" >/dev/null 2>&1 && "${P[@]}" start "$first" >/dev/null 2>&1 || restart_ok=1
        urls[$first]="$(url_of "$first" "$net")"
    fi
    python3 "$work/tb.py" restarted "${urls[$first]}" "$age_before" 60 "$work/$mode-restart.json" || restart_ok=1

    # the image's HEALTHCHECK, run once by hand
    local health="{" stops="{" sep="" st
    for name in "${names[@]}"; do
        st=unhealthy
        "${P[@]}" healthcheck run "$name" >/dev/null 2>&1 && st=healthy
        health+="$sep\"$name\": \"$st\""; sep=", "
    done
    health+="}"
    echo "$health" >"$work/$mode-health.json"

    # SIGTERM all at once, then the exit codes
    local t0=$SECONDS
    "${P[@]}" stop -t 30 "${names[@]}" >/dev/null 2>"$work/stop.err" || cat "$work/stop.err" >&2
    echo "   podman stop (SIGTERM) of $nodes containers took $((SECONDS - t0)) s"
    sep=""
    mkdir -p "$results_dir/$mode"
    for name in "${names[@]}"; do
        stops+="$sep\"$name\": $("${P[@]}" inspect -f '{{.State.ExitCode}}' "$name")"; sep=", "
        "${P[@]}" logs "$name" >"$results_dir/$mode/$name.log" 2>&1 || true
    done
    stops+="}"
    echo "$stops" >"$work/$mode-stops.json"
    if [ "$keep" = 0 ] && [ "$compose" = 1 ]; then
        compose_cmd "$mode" down -v -t 0 >/dev/null 2>&1
    elif [ "$keep" = 0 ]; then
        "${P[@]}" rm -f -v "${names[@]}" >/dev/null 2>&1
        "${P[@]}" network rm -f "$net" >/dev/null 2>&1
    fi
    python3 "$work/report.py" "$work/$mode-rows.json" "$work/$mode-stops.json" "$mode" "$tolerance" \
        "$work/$mode-table.md" "$work/$mode-health.json" || return 1
    python3 - "$work/$mode-restart.json" "$first" "$compose" "$work/$mode-restart-"*.json >>"$work/$mode-table.md" <<'PY' || return 1
import json, sys
r = json.load(open(sys.argv[1]))
how = ("`podman-compose down`, then `up -d`: every replica a new container, the same `state` volume" if sys.argv[3] == "1"
       else "`podman stop`, then `podman start`: the same container, GOSSIPFL_STATE_DIR in its /var/lib/gossipfl")
print(f"\nRestart of {sys.argv[2]} after the run ({how}): resumed **{r['resumed']}** from the checkpoint of"
      f" {(r['resumed_from'] or {}).get('saved_at')} at age {(r['resumed_from'] or {}).get('age')}; age {r['age_before']}"
      f" before the stop, {r['age_after']} when it answered again {r['seconds']} s after the start.")
others = [json.load(open(f)) for f in sys.argv[4:] if not f.endswith("*.json")]
if others:
    print(f"The {len(others)} other recreated replicas resumed: {[o['resumed'] for o in others]} (from ages"
          f" {[(o['resumed_from'] or {}).get('age') for o in others]}).")
PY
    [ "$restart_ok" = 0 ] || { echo "!! $mode: the restarted node did not resume from its checkpoint" >&2; return 1; }
    return "$intruder_ok"
}

rc=0
ran=()
for mode in "${modes[@]}"; do
    if [ "$mode" = dns ] && [ "$dns_ok" = 0 ]; then
        echo "!! this image's gossipfl has no DNS discovery (--dns-name): dns skipped" >&2; rc=1; continue
    fi
    run_mode "$mode" || rc=1
    ran+=("$mode")
done

{
    if [ "$compose" = 1 ]; then echo "# Compose testbed"; else echo "# Container testbed"; fi
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname) ($(nproc) cores), $("${P[@]}" --version), command:"
    echo "\`scripts/container_testbed.sh --nodes $nodes --duration $duration --discovery $discovery$([ "$secure" = 1 ] && echo " --secure")$([ "$compose" = 1 ] && echo " --compose")\`"
    echo
    echo "Image \`$image\` ($image_id, built from docker/Dockerfile on \`${base:-(not rebuilt)}\`, package at commit"
    echo "$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- gossipfl pyproject.toml docker 2>/dev/null || echo ' + local changes'))."
    if [ "$compose" = 1 ]; then
        echo "The replicas of \`docker/compose.yaml\` itself (dns: with \`docker/compose.dns.yaml\`), started by"
        echo "\`$("${PC[@]}" --version 2>/dev/null | grep -m1 podman-compose)\` as project gossipfl-tb-<mode> with NODES=$nodes: partition"
        echo "\`auto/$nodes\` from the replica name gossipfl-tb-<mode>_node_<i> (shard i mod N), the file's healthcheck,"
        echo "restart policy, logging and \`state\` volume; task digits, iid shards. After the run every replica is"
        echo "recreated (\`down\`, \`up -d\`) and must resume from its own checkpoint."
    else
    echo "One container per node on a podman bridge network (\`--internal\`), options from \`GOSSIPFL_*\` env only:"
    echo "partition \`$([ "$auto_ok" = 1 ] && echo "auto/$nodes" || echo "K/$nodes per container (FALLBACK: no auto/N in this image)")\`"
    echo "(container i = 1..N has hostname gossipfl-tb-<mode>-i, shard i mod N), task digits, iid shards."
    fi
    echo "Accuracy is on the shared 360-image test split, read from each node's /v1/status over HTTP"
    echo "after ${duration} s of training (counted from the moment all nodes knew each other). Exit codes"
    echo "are those of \`podman stop\` (SIGTERM). Node logs: $results_dir/<mode>/."
    for mode in "${ran[@]}"; do
        echo
        case "$mode" in
            mdns) echo "## mDNS discovery (GOSSIPFL_DISCOVERY=mdns)" ;;
            dns) if [ "$compose" = 1 ]; then echo "## DNS discovery (docker/compose.dns.yaml: GOSSIPFL_DNS_NAME=node, the service name; aardvark-dns)"
                 else echo "## DNS discovery (GOSSIPFL_DISCOVERY=dns, GOSSIPFL_DNS_NAME=gossipfl-nodes, a network alias of every container; aardvark-dns)"; fi ;;
        esac
        echo
        if [ -f "$work/$mode-table.md" ]; then cat "$work/$mode-table.md"; else echo "**$mode: FAIL** (no result; see the script's output)"; fi
    done
} >"$out"
echo
echo "results: $out"
exit $rc
