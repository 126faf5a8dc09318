#!/usr/bin/env bash
# A two-node Ray cluster on this machine: a head ({"node_head": 1}) and node_b ({"node_b": 1}), each its
# own `ray start`, token authentication on. For trying STRICT_SPREAD placement and the loss of a node
# without a second host; see docs/cluster.md ("Two nodes on one machine").
#
#   cluster/local_two_nodes.sh start      # head + node_b (1 CPU each; --head-cpus/--node-cpus N)
#   cluster/local_two_nodes.sh status     # each node's processes and Ray's view; how to connect
#   cluster/local_two_nodes.sh kill-node  # SIGKILL every process of node_b (a lost host)
#   cluster/local_two_nodes.sh add-node   # node_b again (a replacement host, same label)
#   cluster/local_two_nodes.sh stop       # both nodes (only this cluster's processes; never `ray stop`)
#
# All of it lives in --dir (default /tmp/recgpt-2nodes). Python: $PYTHON, else the repository's .venv,
# else python3. Bad input or a failed step: one line on stderr, exit 2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
# The repository on the path (not a cd): a relative --dir stays relative to the caller's directory.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m launcher.local_cluster "$@"
