#!/usr/bin/env bash
# A one-node Ceph cluster with the RADOS Gateway on 127.0.0.1, for the S3 store's tests and
# benchmarks. Debian's Ceph 16 packages (ceph-mon, ceph-osd, radosgw, ceph-common) provide the
# daemons; .ci/run installs them.
#
#   .ci/ceph.sh start      start whatever is not running (idempotent); prints the env file
#   .ci/ceph.sh env        prints the env file (KEY=VALUE lines) of a running cluster
#   .ci/ceph.sh status     exit 0 when the gateway answers S3
#   .ci/ceph.sh kill-rgw   SIGKILLs the gateway only (fault tests); `start` brings it back
#   .ci/ceph.sh stop       stops every daemon and removes the cluster's data
#
# The cluster: one monitor, one OSD (bluestore on a sparse file), one radosgw; no ceph-mgr
# (the gateway does not need it), cephx off. Everything lives under $CEPH_DIR: ceph.conf,
# daemon data, logs, pid files, and `env` with the endpoint and the credentials of an S3
# user made for the tests:
#   AWS_ENDPOINT_URL=http://127.0.0.1:PORT AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
#   AWS_REGION=default
#
# Settings (environment):
#   DISKSNAP_CEPH_PORT   the gateway's port on 127.0.0.1 (default 7480); the monitor takes
#                        PORT+1 (msgr v1 only) and the OSD binds ports of its own on 127.0.0.1
#   DISKSNAP_CEPH_DIR    where the cluster lives (default ${TMPDIR:-/tmp}/disksnap-ceph-PORT)
#   DISKSNAP_CEPH_OSD_SIZE  size of the OSD's sparse block file (default 40G)
#
# Pitfalls this script works around (found on Debian 12, Ceph 16.2.15):
# - with cephx off, radosgw hangs at "get_initial_auth_request returned -13" unless it uses
#   `ms mon client mode = crc` (set globally here);
# - an OSD must exist in the OSD map before it boots (`ceph osd new`), and pools need size 1
#   on a one-OSD cluster (`mon allow pool size one`);
# - on a loaded machine the OSD's own start-up CRUSH commands (set its device class, place it
#   in the map) can be sent before its monitor client knows the cluster's fsid; the monitor
#   answers 'wrong fsid' and the OSD exits ("init unable to update_crush_device_class"). So
#   the OSD makes no CRUSH change at start (`osd crush update on start = false`, `osd class
#   update on start = false`); this script places it in the map before it boots.
# A cluster that still fails to come up is made anew once, with the failing log's tail shown.
set -euo pipefail

PORT=${DISKSNAP_CEPH_PORT:-7480}
DIR=${DISKSNAP_CEPH_DIR:-${TMPDIR:-/tmp}/disksnap-ceph-$PORT}
MON_PORT=$((PORT + 1))
OSD_SIZE=${DISKSNAP_CEPH_OSD_SIZE:-40G}
CONF=$DIR/ceph.conf
ENVFILE=$DIR/env
RGW_NAME=client.rgw.disksnap

say() { echo "ceph.sh: $*" >&2; }
die() {
  say "$*"
  exit 1
}

need_tools() {
  local t missing=()
  for t in ceph-mon ceph-osd radosgw radosgw-admin ceph ceph-authtool uuidgen curl; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing ${missing[*]} (apt-get install ceph-mon ceph-osd radosgw ceph-common uuid-runtime curl)"
  fi
}

pid_alive() { # pidfile
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

s3_answers() {
  curl -s -o /dev/null -m 3 -w '%{http_code}' "http://127.0.0.1:$PORT/" 2>/dev/null | grep -q '^[2-4]'
}

write_conf() {
  local fsid=$1
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon initial members = a
mon host = v1:127.0.0.1:$MON_PORT
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr2 = false
ms mon client mode = crc
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
keyring = $DIR/keyring
mon data = $DIR/mon/\$cluster-\$id
osd data = $DIR/osd/\$cluster-\$id

[mon.a]
public addr = v1:127.0.0.1:$MON_PORT

[osd]
osd crush update on start = false
osd class update on start = false
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $(numfmt --from=iec "$OSD_SIZE")
bluestore block db create = false
bluestore block wal create = false
osd memory target = 1073741824
bluestore cache autotune = true
osd op num shards = 2
osd op num threads per shard = 2

[$RGW_NAME]
rgw frontends = beast endpoint=127.0.0.1:$PORT tcp_nodelay=1
rgw data = $DIR/rgw
ms mon client mode = crc
rgw thread pool size = 128
rgw dns name = 127.0.0.1
EOF
}

# Runs a ceph CLI command against this cluster, bounded in time.
cephc() { timeout 60 ceph -c "$CONF" "$@"; }

start_mon() {
  pid_alive "$DIR/run/mon.a.pid" && return 0
  ceph-mon -c "$CONF" -i a 9>&- >>"$DIR/log/start.log" 2>&1 || die "ceph-mon did not start (see $DIR/log/mon.a.log)"
}

# The last error lines a daemon logged, for a failure message.
log_errors() { # logfile
  grep -E '^[0-9T:.+-]+ [0-9a-f]+ +-1 ' "$1" 2>/dev/null | tail -n 3 | sed 's/^/  /' || true
}

start_osd() {
  pid_alive "$DIR/run/osd.0.pid" && return 0
  ceph-osd -c "$CONF" -i 0 9>&- >>"$DIR/log/start.log" 2>&1 ||
    die "ceph-osd did not start (see $DIR/log/osd.0.log):
$(log_errors "$DIR/log/osd.0.log")"
}

start_rgw() {
  pid_alive "$DIR/run/$RGW_NAME.pid" && return 0
  radosgw -c "$CONF" -n "$RGW_NAME" 9>&- >>"$DIR/log/start.log" 2>&1 || die "radosgw did not start (see $DIR/log/$RGW_NAME.log)"
}

wait_s3() {
  local i
  for i in $(seq 1 240); do
    s3_answers && return 0
    pid_alive "$DIR/run/$RGW_NAME.pid" || [ "$i" -lt 10 ] || die "radosgw exited (see $DIR/log/$RGW_NAME.log)"
    sleep 0.5
  done
  die "radosgw on 127.0.0.1:$PORT did not answer within 2 minutes (see $DIR/log/)"
}

create_cluster() {
  local fsid osd_uuid id
  # A start that failed part-way leaves its daemons running: stop them while their pid files
  # still say which they are, or the new monitor finds its port taken (and so every later start).
  stop_daemons
  rm -rf "$DIR"
  mkdir -p "$DIR"/{run,log,mon,osd/ceph-0,rgw}
  fsid=$(uuidgen)
  write_conf "$fsid"
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null ||
    die "ceph-authtool could not make the monitor's keyring"
  ceph-mon -c "$CONF" --mkfs -i a --fsid "$fsid" --keyring "$DIR/keyring" >"$DIR/log/mkfs-mon.log" 2>&1 ||
    die "ceph-mon --mkfs failed: $(tail -n 3 "$DIR/log/mkfs-mon.log")"
  start_mon
  osd_uuid=$(uuidgen)
  id=$(cephc osd new "$osd_uuid" 2>"$DIR/log/osd-new.log") || die "ceph osd new failed: $(tail -n 3 "$DIR/log/osd-new.log")"
  [ "$id" = 0 ] || die "ceph osd new gave id '$id', expected 0"
  cephc osd crush add osd.0 1.0 root=default host=disksnap >"$DIR/log/osd-crush.log" 2>&1 ||
    die "ceph osd crush add failed: $(tail -n 3 "$DIR/log/osd-crush.log")"
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$DIR/log/mkfs-osd.log" 2>&1 ||
    die "ceph-osd --mkfs failed: $(tail -n 3 "$DIR/log/mkfs-osd.log")"
  start_osd
  start_rgw
  wait_s3
  local access secret
  access=DISKSNAP$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)
  secret=$(head -c 30 /dev/urandom | base64 | tr -d '/+=\n')
  radosgw-admin -c "$CONF" -n "$RGW_NAME" user create --uid=disksnap --display-name=disksnap \
    --access-key="$access" --secret-key="$secret" >"$DIR/log/user-create.log" 2>&1 ||
    die "radosgw-admin user create failed: $(tail -n 3 "$DIR/log/user-create.log")"
  cat >"$ENVFILE.tmp" <<EOF
AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
AWS_ACCESS_KEY_ID=$access
AWS_SECRET_ACCESS_KEY=$secret
AWS_REGION=default
DISKSNAP_CEPH_DIR=$DIR
DISKSNAP_CEPH_RGW_PIDFILE=$DIR/run/$RGW_NAME.pid
EOF
  mv "$ENVFILE.tmp" "$ENVFILE"
}

cmd_start() {
  need_tools
  mkdir -p "$(dirname "$DIR")"
  exec 9>"$DIR.lock"
  flock 9
  if [ -s "$ENVFILE" ] && [ -s "$CONF" ]; then
    start_mon
    start_osd
    start_rgw
    wait_s3
  elif ! (create_cluster); then
    # (in that subshell `set -e` is off, as in any tested command: every daemon and tool
    # step ends in `|| die`, which leaves the subshell; a failed mkdir or uuidgen makes the
    # next of those fail, and a missing env file fails the `cat` below)
    say "making the cluster anew"
    create_cluster
  fi
  cat "$ENVFILE"
}

stop_one() { # pidfile
  local pf=$1 pid i
  [ -s "$pf" ] || return 0
  pid=$(cat "$pf")
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
  [ -d "$DIR" ] || return 0
  exec 9>"$DIR.lock"
  flock 9
  stop_daemons
  rm -rf "$DIR"
  rm -f "$DIR.lock"
}

stop_daemons() {
  stop_one "$DIR/run/$RGW_NAME.pid"
  stop_one "$DIR/run/osd.0.pid"
  stop_one "$DIR/run/mon.a.pid"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
env)
  [ -s "$ENVFILE" ] || die "no cluster at $DIR (run: $0 start)"
  cat "$ENVFILE"
  ;;
status)
  [ -s "$ENVFILE" ] && s3_answers
  ;;
kill-rgw)
  pf="$DIR/run/$RGW_NAME.pid"
  pid_alive "$pf" || die "radosgw is not running"
  pid=$(cat "$pf")
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  ;;
*)
  echo "usage: $0 start|stop|env|status|kill-rgw" >&2
  exit 2
  ;;
esac
