"""The imperative shell: kopf handlers, the per-flow writer, NATS and Kubernetes I/O.

Lower modules (``kube``, ``bus``, ``metrics``) import nothing from higher ones (``runner``,
``handlers``); the engine decides, this layer does.
"""
