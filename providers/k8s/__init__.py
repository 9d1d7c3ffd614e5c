"""The ``k8s`` provider: one pod per environment on a Kubernetes cluster, through the official
``kubernetes`` client (:mod:`.provider`); its manifests are built by pure functions
(:mod:`.manifests`) and its configuration lives apart (:mod:`.config`) so it validates without
the client installed."""
