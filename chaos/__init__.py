"""``make chaos``: many seed-shaped flows run while the operator is SIGKILLed again and again
and nats-server, kube-apiserver and etcd are restarted or paused; then figures on what users
rely on (every flow ends, no result lost, nothing executed twice under exactlyOnce, every
event stream complete). See docs/reliability.md."""
